"""The test-support package of the integration, e2e and chart tests (and of hack/demo.py and
hack/benchmark.py, run with PYTHONPATH=tests): one module per concern, imported by name
(`from support.vms import create_vm`). Shared fixtures built on it: tests/conftest.py."""
