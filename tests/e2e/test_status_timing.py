"""Issue P end to end: a phase change reaches status at once, even while a progress write
waits for its slot. The agent runs with a long status interval (10 s), so that a phase change
held back to the next progress slot would show as seconds; libvirt's READY event is seen by
this test through a libvirt event loop of its own."""

from __future__ import annotations

import os
import time

import libvirt

from support.libvirt_probes import BlockJobEvents, live_disk_source
from support.objects import copy_spec
from support.waits import wait_for


def test_phase_change_is_not_held_back_by_a_pending_progress_write(agent_factory, vms,
                                                                   blockcopies, node):
    agent_factory(status_interval=10)
    vm = vms(layers=2, size="256M", data_per_layer="64M")
    events = BlockJobEvents(vm)
    try:
        dest = os.path.join(vm.workdir, "copy.qcow2")
        name = blockcopies.create(copy_spec(vm, node=node, dest=dest, bandwidth="2Mi"))
        # Copying, and a progress write done: the next progress slot is up to 10 s away.
        first = blockcopies.wait_copying(name, counter="cur", above=0, timeout=60)
        wait_for(lambda: blockcopies.status(name).get("cur", 0) > first["cur"], 30,
                 what="a second progress write")
        blockcopies.patch_spec(name, {"bandwidth": 0})  # now it converges within a second
        ready = wait_for(lambda: events.first_monotonic(libvirt.VIR_DOMAIN_BLOCK_JOB_READY),
                         60, what="libvirt's READY event")
        seen = wait_for(lambda: blockcopies.status(name).get("phase") == "Mirrored"
                        and time.monotonic(), 30, interval=0.02, what="Mirrored in status")
        # Well under the 10 s progress interval: the phase change did not wait for a slot.
        assert seen - ready < 2.0, seen - ready
        status = blockcopies.status(name)
        assert status["cur"] == status["end"]  # and it carried the newest progress
        t0 = time.monotonic()
        blockcopies.patch_spec(name, {"pivot": True})
        wait_for(lambda: blockcopies.status(name).get("phase") == "Pivoted", 30, interval=0.02,
                 what="Pivoted")
        assert time.monotonic() - t0 < 3.0
        assert live_disk_source(vm, "vda") == dest
    finally:
        events.close()
