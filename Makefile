# blockcopy-operator: every target installs what it needs (run as root on Debian 12).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE_DIR ?= $(or $(BLOCKCOPY_CACHE_DIR),/var/cache/blockcopy-operator)
export BLOCKCOPY_CACHE_DIR := $(CACHE_DIR)
export KUBECONFIG := $(or $(BLOCKCOPY_STATE_DIR),$(CURDIR)/.local)/kubeconfig
STATE_DIR ?= $(or $(BLOCKCOPY_STATE_DIR),$(CURDIR)/.local)
# kubectl of the local server's release and helm, linked by hack/install-kube-tools.sh.
export PATH := $(STATE_DIR)/bin:$(PATH)
PYTEST_ARGS ?=
# The libvirt + QEMU stack every target runs on: stock (Debian 12: libvirt 9.0, QEMU 7.2) or
# backports (bookworm-backports: libvirt 11.3, QEMU 10.0); see hack/hypervisor-stack.sh.
export HYPERVISOR_STACK ?= stock

.PHONY: help deps system-deps venv dist lock registry release cluster cluster-node cluster-nodes cluster-down lint unit integration e2e soak chart chart-e2e image test test-k8s-oldest demo bench clean

help:
	@echo "make demo          bring up the local environment and show a live disk copy + pivot"
	@echo "make test          lint + unit + integration (libvirt) + end-to-end (API server + libvirt + agent; the chart on a one-node cluster)"
	@echo "make cluster       start etcd, kube-apiserver, libvirtd (kubeconfig: .local/kubeconfig)"
	@echo "make cluster-node  + kube-scheduler, kubelet, containerd: a one-node cluster that runs the chart's pod"
	@echo "make cluster-nodes NODES=4  + N simulated hypervisor nodes (libvirt session daemons), an agent each (.local/nodes.json)"
	@echo "make cluster-down  stop everything and remove test VMs and images"
	@echo "make test-k8s-oldest  CRD + chart + one real copy on the oldest supported Kubernetes ($(OLDEST_KUBE_VERSION))"
	@echo "make chart         Helm chart: lint, render, validate offline (1.29..newest), schema, Argo CD/Flux health checks"
	@echo "make image         build the agent image with buildah (localhost/blockcopy-operator:dev)"
	@echo "make dist          the kubectl plugin alone: its wheel, krew archive and manifest in dist/"
	@echo "make lock          re-lock requirements/*.txt (hashed, uv) after a pyproject.toml change"
	@echo "make registry      start the local OCI registry (127.0.0.1:$${BLOCKCOPY_REGISTRY_PORT:-15000}); cluster-down stops it"
	@echo "make release VERSION=x.y.z  dist/VERSION: image (OCI archive), chart, install.yaml, SBOM, SHA256SUMS;"
	@echo "                   image and chart pushed to RELEASE_REGISTRY (default: the local registry); NO_IMAGE=1: offline"
	@echo "make bench         numbers: agent vs virsh blockcopy, status writes, latency, memory, a 40-disk plan"
	@echo "make soak          the e2e tier SOAK (5) times over, stopping at the first failure"

deps: system-deps venv

system-deps:
	@./hack/install-system-deps.sh

# The virtualenv, from the hashed lock files only (hack/lock.sh): pip and the build backend
# first, then every dependency at its locked version (--require-hashes; --no-build-isolation,
# so libvirt-python's sdist builds with the locked setuptools), then this project, editable.
# Rebuilt when pyproject.toml or a lock file changes.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml requirements/build.txt requirements/ci.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements/build.txt
	$(PY) -m pip install -q --require-hashes --no-deps --no-build-isolation -r requirements/ci.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

# The kubectl plugin as a distribution of its own (hack/plugin_dist.py): dist/ gets its wheel
# (kubectl-blockcopy: the Kubernetes client and PyYAML, no kopf, no libvirt), the krew archive
# and the krew manifest (plugin/blockcopy.yaml) with the archive's uri and sha256.
# PLUGIN_URL_BASE: where the release serves the archive (default: file://dist).
PLUGIN_URL_BASE ?=
dist: venv
	$(PY) hack/plugin_dist.py --out dist $(if $(PLUGIN_URL_BASE),--url-base $(PLUGIN_URL_BASE))

# requirements/*.txt from pyproject.toml and requirements/build.in (uv, pinned; needs PyPI).
# `hack/lock.sh --check` says whether they are current; `--upgrade` moves every pin.
lock:
	./hack/lock.sh

cluster: deps
	@./hack/cluster-up.sh

# The local environment as a one-node cluster that runs pods (kube-scheduler, kubelet,
# containerd + runc, a local pause image, the agent image of `make image` imported). The node
# is tainted blockcopy.dev/test-node=true:NoSchedule: only what tolerates it runs there.
# Its containerd pulls from the local registry (started here: the release tests push there).
cluster-node: cluster image registry
	@./hack/cluster-node.sh

# N simulated nodes for multi-node tests (hack/cluster-nodes.sh): each a libvirt session
# daemon of its own user (its own domains), an agent of this checkout's venv and a Node
# object (labelled, tainted blockcopy.dev/simulated=true:NoSchedule); .local/nodes.json
# lists them. Running it again with another NODES grows or shrinks the set.
NODES ?= 4
cluster-nodes: cluster
	@NODES=$(NODES) ./hack/cluster-nodes.sh

cluster-down:
	@./hack/cluster-down.sh

lint: venv
	$(VENV)/bin/ruff check operator tests hack
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: cluster
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: cluster
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# The e2e tier SOAK times over (the whole tier, then again), stopping at the first failure:
# a test that fails once in N runs is a defect, and one run does not show it.
SOAK ?= 5
soak: cluster
	$(PY) -m pytest tests/e2e --count $(SOAK) --repeat-scope session -x $(PYTEST_ARGS)

# The GitOps health checks run Flux's kstatus and Argo CD's Lua sandbox from Go modules
# (tests/gitops, built once per content into the cache by hack/build-gitops-health.sh).
chart: venv
	./hack/build-gitops-health.sh >/dev/null
	$(PY) -m pytest tests/chart -m "not e2e" --deselect tests/chart/test_image_build.py::test_build_image_and_run_help $(PYTEST_ARGS)

chart-e2e: cluster cluster-node
	$(PY) -m pytest tests/chart/test_helm_install_rbac.py tests/chart/test_dashboard.py tests/chart/test_chart_on_a_node.py tests/chart/test_release_on_a_node.py -m e2e $(PYTEST_ARGS)

image: system-deps
	./hack/build-image.sh

# The local OCI registry (CNCF distribution, built from Go modules once into the cache):
# releases are pushed there, the one-node cluster's containerd pulls from it.
registry:
	@./hack/registry.sh start

# make release VERSION=x.y.z (hack/release.sh): dist/VERSION/. The image and the chart are
# pushed to RELEASE_REGISTRY (host[/org]; default: the local registry, started here);
# NO_IMAGE=1 makes the chart, install.yaml and the SBOM only (nothing pushed).
RELEASE_REGISTRY ?=
release: venv system-deps
	@test -n "$(VERSION)" || { echo "usage: make release VERSION=x.y.z [NO_IMAGE=1] [RELEASE_REGISTRY=host/org]" >&2; exit 2; }
ifeq ($(NO_IMAGE),)
	registry="$(RELEASE_REGISTRY)"; [ -n "$$registry" ] || registry=$$(./hack/registry.sh start); \
	RELEASE_REGISTRY="$$registry" ./hack/release.sh "$(VERSION)" --push
else
	./hack/release.sh "$(VERSION)" --no-image
endif

# The whole suite, as CI runs it (the chart's pod on a real kubelet included).
test: deps lint cluster cluster-node
	rm -rf .local/coverage && mkdir -p .local/coverage
	$(PY) -m pytest tests --cov --cov-report=term:skip-covered --durations=30 $(PYTEST_ARGS)

# The oldest Kubernetes release we support, checked at a moderate cost (not part of `make
# test`): a second local cluster on other ports and its own state dir, the CRD created and
# enforced by that server, the chart installed with its crds/, and one real copy + pivot.
OLDEST_KUBE_VERSION ?= 1.31.0
OLDEST_ENV := KUBE_VERSION=$(OLDEST_KUBE_VERSION) BLOCKCOPY_STATE_DIR=$(CURDIR)/.local-k8s-oldest \
	BLOCKCOPY_API_PORT=16444 BLOCKCOPY_ETCD_PORT=23791 BLOCKCOPY_ETCD_PEER_PORT=23801 \
	BLOCKCOPY_KCM_PORT=16258 KUBECONFIG=$(CURDIR)/.local-k8s-oldest/kubeconfig \
	PATH=$(CURDIR)/.local-k8s-oldest/bin:$(PATH)
test-k8s-oldest: deps
	$(OLDEST_ENV) ./hack/cluster-up.sh
	$(OLDEST_ENV) $(PY) -m pytest tests/e2e/test_crd_on_server.py \
		tests/chart/test_helm_install_rbac.py \
		tests/e2e/test_walking_skeleton.py::test_pivot_true_from_the_start $(PYTEST_ARGS); \
	status=$$?; $(OLDEST_ENV) BLOCKCOPY_KEEP_VMS=1 ./hack/cluster-down.sh; exit $$status

# hack/ scripts import the test-support package (tests/support: VM factory, agent launcher).
demo: cluster
	PYTHONPATH=tests $(PY) hack/demo.py

# Numbers, not pass/fail: agent vs virsh, status-write rate, latency, memory; part "plan"
# (hack/bench_plan.py) brings up the 4 simulated nodes of cluster-nodes itself when missing.
bench: cluster
	PYTHONPATH=tests $(PY) hack/benchmark.py $(BENCH_ARGS)

clean: cluster-down
	rm -rf $(VENV) .local *.egg-info operator/*.egg-info
