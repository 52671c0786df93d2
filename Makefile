# blockcopy-operator: every target installs what it needs (run as root on Debian 12).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE_DIR ?= $(or $(BLOCKCOPY_CACHE_DIR),/var/cache/blockcopy-operator)
export BLOCKCOPY_CACHE_DIR := $(CACHE_DIR)
export KUBECONFIG := $(CURDIR)/.local/kubeconfig
export PATH := $(CACHE_DIR)/bin:$(PATH)
PYTEST_ARGS ?=

.PHONY: help deps system-deps venv cluster cluster-down lint unit integration e2e chart chart-e2e image test demo bench clean

help:
	@echo "make demo          bring up the local environment and show a live disk copy + pivot"
	@echo "make test          lint + unit + integration (libvirt) + end-to-end (API server + libvirt + agent)"
	@echo "make cluster       start etcd, kube-apiserver, libvirtd (kubeconfig: .local/kubeconfig)"
	@echo "make cluster-down  stop everything and remove test VMs and images"
	@echo "make chart         Helm chart: lint, render, validate offline (1.29..newest), schema, Argo CD/Flux health checks"
	@echo "make image         build the agent image with buildah (localhost/blockcopy-operator:dev)"
	@echo "make bench         numbers: agent vs virsh blockcopy, status writes, latency, memory"

deps: system-deps venv

system-deps:
	@./hack/install-system-deps.sh

# The virtualenv is rebuilt when pyproject.toml changes.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

cluster: deps
	@./hack/cluster-up.sh

cluster-down:
	@./hack/cluster-down.sh

lint: venv
	$(VENV)/bin/ruff check operator tests hack
	$(VENV)/bin/lint-imports

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: cluster
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: cluster
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

chart: venv
	$(PY) -m pytest tests/chart -m "not e2e" --deselect tests/chart/test_image_build.py::test_build_image_and_run_help $(PYTEST_ARGS)

chart-e2e: cluster
	$(PY) -m pytest tests/chart/test_helm_install_rbac.py $(PYTEST_ARGS)

image: system-deps
	./hack/build-image.sh

# The whole suite, as CI runs it.
test: deps lint cluster
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: cluster
	$(PY) hack/demo.py

# Numbers, not pass/fail: agent vs virsh, status-write rate, latency, memory.
bench: cluster
	$(PY) hack/benchmark.py

clean: cluster-down
	rm -rf $(VENV) .local *.egg-info operator/*.egg-info
