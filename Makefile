# ployz: `make test` runs everything CI runs; `make demo` moves a workload on the local
# environment. Both install what a fresh machine lacks.
SHELL := /bin/bash
CARGO ?= cargo
export PLOYZ_CACHE ?= $(HOME)/.cache/ployz

.PHONY: test demo deps bins images image lint chart unit e2e smoke migrate openzfs vm-image bench env crds examples fmt

# The environment's inputs: cluster binaries built from Go modules, container images built
# locally; both cached under $(PLOYZ_CACHE), so later runs build nothing.
ENV_DIRS = PLOYZ_BIN_DIR=$$(tests/env/build-bins.sh) PLOYZ_IMAGES_DIR=$$(tests/images/build-images.sh) \
	PLOYZ_CSI_NODE_DIR=$$(tests/csi-node/build.sh) PLOYZ_HELM=$$(tests/env/build-helm.sh)

test: deps lint chart unit e2e openzfs

# The README's first command: two machines, an agent on each, a stateful app moved from
# machine-a to machine-b and back. Tears everything down at the end and on Ctrl-C.
demo: deps bins images
	# The agent the demo's image is built from, as the suites build it: the fault tests' crash
	# points compiled in, inert.
	$(CARGO) build -q --locked -p ployz -p ployzctl --bins --features ployz/failpoints
	$(ENV_DIRS) $(CARGO) run -q --locked -p ployz-e2e --bin ployz-demo

# System packages (zfs-fuse, containerd, runc, CNI plugins, iproute2, ...) a fresh machine lacks.
deps:
	@tests/env/install-deps.sh

# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl, kwok and helm,
# built from Go modules into $(PLOYZ_CACHE); a second run builds nothing.
bins:
	@tests/env/build-bins.sh >/dev/null
	@tests/env/build-helm.sh >/dev/null

# The pod sandbox image and the test app (tests/images), built locally: no registry is reachable;
# and the machines' CSI node plugin for zfs-localpv volumes (tests/csi-node, Go).
images:
	@tests/images/build-images.sh >/dev/null
	@tests/csi-node/build.sh >/dev/null

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# The Helm chart: lint (strict) and render with every optional part on (helm built from its Go
# module, cached like the cluster's binaries). The suites apply what it renders.
chart:
	@helm=$$(tests/env/build-helm.sh) && $$helm lint --strict charts/ployz \
		&& $$helm template ployz charts/ployz --namespace ployz-system \
			--set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true >/dev/null \
		&& $$helm lint --strict charts/ployz --set admissionPolicies.enabled=false

# Also the harness's own pure parts (the app's ledger checks, the reaper's journal).
unit:
	$(CARGO) test --workspace --exclude ployz-e2e --locked
	$(CARGO) test -p ployz-e2e --lib --locked

# End-to-end suites on a real control plane, real nodes (kubelet, containerd, runc), real
# zfs-fuse machines and network namespaces.
e2e: deps bins images
	$(CARGO) build -q --locked -p ployz --bin ployz-controller --features failpoints
	$(ENV_DIRS) $(CARGO) test -p ployz-e2e --locked \
		--test smoke --test transfer --test migrate --test hygiene

smoke: deps bins images
	$(ENV_DIRS) $(CARGO) test -p ployz-e2e --locked --test smoke

migrate: deps bins images
	$(ENV_DIRS) $(CARGO) test -p ployz-e2e --locked --test migrate

# The OpenZFS 2.3 guest image (about 10 minutes the first time, cached afterwards).
vm-image:
	@tests/vm/build-image.sh >/dev/null

# Conformance of the ZFS layer and the transfer engine on real OpenZFS, in a QEMU guest.
openzfs: vm-image
	PLOYZ_VM_IMAGE=$$(tests/vm/build-image.sh) $(CARGO) test -p ployz-e2e --locked --test openzfs

# The local environment for a person: up until Ctrl-C.
env: deps bins images
	$(ENV_DIRS) $(CARGO) run -q -p ployz-e2e --bin ployz-env

# Throughput of the transfer engine against `zfs send | zfs receive` and ssh, measured in the
# same run; and where a move's downtime goes on real nodes (256 MiB and 4 GiB). Each writes its
# section of docs/BENCHMARKS.md.
bench: deps bins images
	@tests/env/install-deps.sh bench
	$(ENV_DIRS) $(CARGO) bench -p ployz-e2e --locked --bench transfer
	$(ENV_DIRS) $(CARGO) bench -p ployz-e2e --locked --bench downtime
	$(ENV_DIRS) $(CARGO) bench -p ployz-e2e --locked --bench scale

# Release binaries (the agent and ployzctl) and the agent image, built offline from them and
# this machine's `zfs` userland (tests/images/build-agent-image.sh); prints the image's tar,
# ready for `ctr images import` or `docker load`. Containerfile builds the same for a registry.
image:
	$(CARGO) build --release --locked -p ployz --bin ployz-controller --bin ployz-guard -p ployzctl --bin ployzctl --bin kubectl-ployz
	@tests/images/build-agent-image.sh target/release/ployz-controller \
		ployz.dev/agent:$$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/ployz/Chart.yaml)

# Regenerate the CRD YAML from the Rust types, and the chart's copy (a test fails when either
# committed copy drifts).
crds:
	$(CARGO) run -q -p ployz --bin crdgen -- crds
	$(CARGO) run -q -p ployz --bin crdgen -- charts/ployz/crds

examples:
	$(CARGO) run -q -p ployzctl --bin ployzctl -- migrate render-manifest production/web --to machine-b > examples/migration.yaml

fmt:
	$(CARGO) fmt --all
