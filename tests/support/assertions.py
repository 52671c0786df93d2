"""What "the VM was left alone" means, asserted the same way by every test that needs it:
running, on its source chain, without a mirror or a block job (and, for `assert_on_source`,
with its data intact)."""

from __future__ import annotations

from support.images import image_digest
from support.libvirt_probes import blockjob_text, domstate, live_disk_source, live_mirror
from support.vms import VM, expected_digest


def assert_untouched(vm: VM) -> None:
    """Running on its source chain, no mirror, no block job."""
    assert domstate(vm) == "running"
    assert live_disk_source(vm, "vda") == vm.chain[0]
    assert live_mirror(vm, "vda") is None
    assert blockjob_text(vm) == "No current block job for vda"


def assert_on_source(vm: VM) -> None:
    """The VM runs where it ran, on its source chain, no job left, data intact."""
    assert_untouched(vm)
    assert image_digest(vm.chain[0], "qcow2", luks=vm.luks) == expected_digest(vm)
