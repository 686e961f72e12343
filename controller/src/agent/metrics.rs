//! Prometheus metrics of one agent. Labels are bounded (result, phase), never object names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Succeeded, Failed or Cancelled.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

/// An API request: its verb and the resource it names (a bounded set: the kinds the agent
/// reads and writes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: String,
    pub resource: String,
}

/// Which of the agent's watches received an object.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabel {
    pub watch: String,
}

pub struct Metrics {
    registry: Registry,
    pub api_requests: Family<RequestLabels, Counter>,
    pub watch_objects: Family<WatchLabel, Counter>,
    pub plan_seconds: Histogram,
    pub observe_seconds: Histogram,
    pub migrations: Family<ResultLabel, Counter>,
    pub phases: Family<PhaseLabel, Counter>,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    pub duration_seconds: Histogram,
    pub downtime_seconds: Histogram,
    pub active_transfers: Gauge,
    pub reconcile_errors: Counter,
    pub step_watches: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ployz");
        let migrations = Family::<ResultLabel, Counter>::default();
        let phases = Family::<PhaseLabel, Counter>::default();
        let bytes_sent = Counter::default();
        let bytes_received = Counter::default();
        // 1 s .. ~9 h
        let duration_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        // 0.1 s .. ~55 min
        let downtime_seconds = Histogram::new(exponential_buckets(0.1, 2.0, 16));
        let active_transfers = Gauge::default();
        let reconcile_errors = Counter::default();
        let step_watches = Gauge::default();
        let api_requests = Family::<RequestLabels, Counter>::default();
        let watch_objects = Family::<WatchLabel, Counter>::default();
        // 50 µs .. ~6.5 s
        let plan_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        let observe_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        registry.register(
            "api_requests",
            "Requests this agent made to the Kubernetes API, by verb and resource",
            api_requests.clone(),
        );
        registry.register(
            "watch_objects",
            "Objects this agent's watches received (Migrations as target or source; a step's pods or claims)",
            watch_objects.clone(),
        );
        registry.register(
            "plan_seconds",
            "Time the planner took to plan a Migration from the objects it read",
            plan_seconds.clone(),
        );
        registry.register(
            "plan_observe_seconds",
            "Time reading the objects a Migration is planned from",
            observe_seconds.clone(),
        );
        registry.register(
            "step_watches",
            "Watches open for the waiting steps of migrations this agent drives (pods or claims)",
            step_watches.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and were retried",
            reconcile_errors.clone(),
        );
        registry.register(
            "migrations",
            "Migrations this agent finished as source, by result",
            migrations.clone(),
        );
        registry.register(
            "phase_transitions",
            "Phases entered by migrations this agent drives",
            phases.clone(),
        );
        registry.register(
            "sent_bytes",
            "Stream bytes sent to other machines",
            bytes_sent.clone(),
        );
        registry.register(
            "received_bytes",
            "Stream bytes received from other machines",
            bytes_received.clone(),
        );
        registry.register(
            "migration_duration_seconds",
            "From acceptance to a terminal phase",
            duration_seconds.clone(),
        );
        registry.register(
            "downtime_seconds",
            "Workload downtime of successful migrations (scale-down to Ready on the target)",
            downtime_seconds.clone(),
        );
        registry.register(
            "active_transfers",
            "Volume transfers in flight from this machine",
            active_transfers.clone(),
        );
        Self {
            registry,
            api_requests,
            watch_objects,
            plan_seconds,
            observe_seconds,
            migrations,
            phases,
            bytes_sent,
            bytes_received,
            duration_seconds,
            downtime_seconds,
            active_transfers,
            reconcile_errors,
            step_watches,
        }
    }
}

impl Metrics {
    /// Counts one object received by `watch`.
    pub fn watched(&self, watch: &str) {
        self.watch_objects
            .get_or_create(&WatchLabel {
                watch: watch.into(),
            })
            .inc();
    }

    /// Counts one API request by its method, path and query.
    pub fn request(&self, method: &str, path: &str, query: Option<&str>) {
        self.api_requests
            .get_or_create(&request_labels(method, path, query))
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The verb and resource of an API request: `GET /apis/ployz.dev/v1alpha1/namespaces/NS/
/// migrations?watch=true` is a `watch` of `migrations`. A subresource is kept
/// (`deployments/scale`); the object's name and namespace are not (unbounded).
pub fn request_labels(method: &str, path: &str, query: Option<&str>) -> RequestLabels {
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/GROUP/VERSION/...
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..),
        Some(&"apis") => segments.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let resource = match rest {
        [] => "discovery".to_string(),
        [kind] | [kind, _] => (*kind).to_string(),
        [kind, _, sub, ..] => format!("{kind}/{sub}"),
    };
    let verb = match (method, watch, rest.len()) {
        ("GET", true, _) => "watch",
        ("GET", false, 1) => "list",
        ("GET", false, _) => "get",
        ("POST", ..) => "create",
        ("PUT", ..) => "update",
        ("PATCH", ..) => "patch",
        ("DELETE", ..) => "delete",
        _ => "other",
    };
    RequestLabels {
        verb: verb.into(),
        resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(method: &str, path: &str, query: Option<&str>) -> (String, String) {
        let l = request_labels(method, path, query);
        (l.verb, l.resource)
    }

    #[test]
    fn every_metric_is_in_the_operations_guide() {
        let guide = include_str!("../../../docs/operations.md");
        let metrics = Metrics::default();
        // A family shows only once it has a series.
        metrics.request("GET", "/api/v1/pods", None);
        metrics.watched("migrations_source");
        metrics
            .migrations
            .get_or_create(&ResultLabel {
                result: "Succeeded".into(),
            })
            .inc();
        metrics
            .phases
            .get_or_create(&PhaseLabel {
                phase: "Sending".into(),
            })
            .inc();
        let text = metrics.encode();
        let mut names = vec![];
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let mut f = line.split(' ');
            let (Some(name), Some(kind)) = (f.next(), f.next()) else {
                continue;
            };
            // Counters are exposed with `_total`, as the guide lists them.
            names.push(match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_string(),
            });
        }
        assert!(names.len() >= 13, "{text}");
        for name in names {
            assert!(
                guide.contains(&format!("`{name}")),
                "docs/operations.md does not list {name}"
            );
        }
    }

    #[test]
    fn requests_are_labelled_by_verb_and_resource_never_by_name() {
        let cases = [
            (
                (
                    "GET",
                    "/apis/ployz.dev/v1alpha1/migrations",
                    Some("fieldSelector=spec.to%3Da&watch=true&resourceVersion=1"),
                ),
                ("watch", "migrations"),
            ),
            (
                (
                    "GET",
                    "/apis/ployz.dev/v1alpha1/namespaces/ns/migrations",
                    None,
                ),
                ("list", "migrations"),
            ),
            (
                (
                    "GET",
                    "/apis/ployz.dev/v1alpha1/namespaces/ns/migrations/m",
                    None,
                ),
                ("get", "migrations"),
            ),
            (
                (
                    "PATCH",
                    "/apis/ployz.dev/v1alpha1/namespaces/ns/migrations/m/status",
                    None,
                ),
                ("patch", "migrations/status"),
            ),
            (
                (
                    "PATCH",
                    "/apis/apps/v1/namespaces/ns/deployments/db/scale",
                    None,
                ),
                ("patch", "deployments/scale"),
            ),
            (
                ("GET", "/api/v1/persistentvolumes", None),
                ("list", "persistentvolumes"),
            ),
            (
                ("PUT", "/api/v1/persistentvolumes/pv-1", None),
                ("update", "persistentvolumes"),
            ),
            (
                ("POST", "/apis/events.k8s.io/v1/namespaces/ns/events", None),
                ("create", "events"),
            ),
            (("GET", "/api/v1/namespaces", None), ("list", "namespaces")),
            (
                ("GET", "/api/v1/namespaces/ns", None),
                ("get", "namespaces"),
            ),
            (("GET", "/version", None), ("get", "discovery")),
        ];
        for ((method, path, query), (verb, resource)) in cases {
            assert_eq!(
                labels(method, path, query),
                (verb.to_string(), resource.to_string()),
                "{method} {path}"
            );
        }
    }
}
