"""Issue P end to end: a phase change reaches status at once, even while a progress write
waits for its slot. The agent runs with a long status interval (10 s) so that a phase change
delayed to the next progress slot would show as seconds; libvirt's READY event is seen by
this test through a libvirt event loop of its own."""

from __future__ import annotations

import os
import threading
import time
import uuid

import libvirt
from e2elib import wait_for

import testvm


class ReadyEvents:
    """Arrival time (monotonic) of the first BLOCK_JOB_2 READY of each domain."""

    _registered = False

    def __init__(self) -> None:
        if not ReadyEvents._registered:
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=self._loop, daemon=True).start()
            ReadyEvents._registered = True
        self.conn = libvirt.open("qemu:///system")
        self.ready: dict[str, float] = {}
        self.callback = self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_event, None)

    @staticmethod
    def _loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def _on_event(self, conn, dom, disk, job_type, status, opaque) -> None:
        if status == libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
            self.ready.setdefault(dom.name(), time.monotonic())

    def close(self) -> None:
        self.conn.domainEventDeregisterAny(self.callback)
        self.conn.close()


def test_phase_change_is_not_held_back_by_a_pending_progress_write(agent_factory, vms,
                                                                   blockcopies):
    node = f"timing-{uuid.uuid4().hex[:6]}"
    agent_factory(node, extra_args=["--status-interval", "10"])
    events = ReadyEvents()
    try:
        vm = vms(layers=2, size="256M", data_per_layer="64M")
        name = blockcopies.create({"domain": vm.name, "disk": "vda", "nodeName": node,
                                   "bandwidth": "2Mi",
                                   "dest": os.path.join(vm.workdir, "copy.qcow2")})
        # Copying, and a progress write done: the next progress slot is up to 10 s away.
        first = blockcopies.wait_copying(name, counter="cur", above=0, timeout=60)
        wait_for(lambda: blockcopies.status(name).get("cur", 0) > first["cur"], 30,
                 what="a second progress write")
        blockcopies.patch_spec(name, {"bandwidth": 0})  # now it converges within a second
        wait_for(lambda: vm.name in events.ready, 60, what="libvirt's READY event")
        ready = events.ready[vm.name]
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
        assert testvm.live_disk_source(vm, "vda") == os.path.join(vm.workdir, "copy.qcow2")
    finally:
        events.close()
