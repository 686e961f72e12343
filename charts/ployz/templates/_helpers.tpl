{{- define "ployz.labels" -}}
app.kubernetes.io/name: ployz
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ployz.selector" -}}
app.kubernetes.io/name: ployz
app.kubernetes.io/component: agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ployz.agentUser" -}}
{{ printf "system:serviceaccount:%s:%s" .Release.Namespace .Values.serviceAccount.name }}
{{- end -}}

{{- define "ployz.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end -}}
