"""FAKES for orchestration tests: an in-memory hypervisor and Kubernetes API behind the
agent's interfaces (``blockcopy.model.ports``). Like Nova's fake libvirt: a small model of
domains, disks and block jobs with the rules the agent relies on (one job per disk, pivot
refused before READY, events on completion), plus knobs to inject faults a real libvirtd
cannot be made to produce on demand. Never a substitute for the e2e tests on real parts.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import os
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from blockcopy.model.api import GROUP, KIND, NODE_LABEL, VERSION, Flag
from blockcopy.model.inventory import (
    BackingImage,
    DiskType,
    DomainState,
    InventoryDisk,
    InventoryDomain,
)
from blockcopy.model.kubeapi import FieldSelectorUnsupported, ObjectRef
from blockcopy.model.observation import (
    DiskInfo,
    DiskState,
    ImageUser,
    JobEvent,
    JobProgress,
    Mirror,
    MirrorReady,
)
from blockcopy.model.ports import (
    Capabilities,
    CopyRequest,
    DataMap,
    DiskSize,
    DomainListener,
    HypervisorError,
    HypervisorUnavailable,
    ImageError,
    ImageInfo,
    JobListener,
)

if TYPE_CHECKING:
    from blockcopy.model.kubeapi import Kube
    from blockcopy.model.ports import Hypervisor, Images


@dataclasses.dataclass
class FakeJob:
    dest: str
    request: CopyRequest
    cur: int = 0
    end: int = 1
    bandwidth: int = 0
    ready: MirrorReady = MirrorReady.COPYING
    copy_mode: str = "background"


@dataclasses.dataclass
class FakeDisk:
    target: str
    source: str
    format: str = "qcow2"
    backing: str | None = None
    chain: tuple[str, ...] = ()  # backing images, nearest first
    chain_formats: tuple[str, ...] = ()
    size: int = 64 << 20
    allocation: int = 1 << 20
    job: FakeJob | None = None
    zero_detection: bool = False  # the (mirror's or, after a pivot, active) node detects zeros
    encryption: str | None = None  # the active image's <encryption> element (LUKS)


@dataclasses.dataclass
class FakeDomain:
    name: str
    uuid: str
    disks: dict[str, FakeDisk]
    running: bool = True
    persistent: bool = False


class FakeHypervisor:
    """``ports.Hypervisor`` in memory. ``calls`` records (loop time, verb, args)."""

    def __init__(self) -> None:
        self.domains: dict[str, FakeDomain] = {}
        self.listeners: list[JobListener] = []
        self.domain_listeners: list[DomainListener] = []
        self.calls: list[tuple[float, str, tuple[Any, ...]]] = []
        self.unreachable = False  # every call raises HypervisorUnavailable
        self.refusals: dict[str, int] = {}  # verb -> how many next calls libvirt refuses
        # verb -> callable run inside the call (races)
        self.on_call: dict[str, Callable[[], object]] = {}
        self.closed = False
        self.suspended: set[str] = set()  # domains paused by quiesce
        self.paused: dict[str, str | None] = {}  # domain -> who paused it (None: not the agent)

    # -- test setup and control --------------------------------------------------------
    def add_domain(self, name: str, *, disks: dict[str, str] | None = None,
                   persistent: bool = False, running: bool = True) -> FakeDomain:
        disks = disks or {"vda": f"/images/{name}.qcow2"}
        dom = FakeDomain(name=name, uuid=str(uuidlib.uuid4()), persistent=persistent,
                         running=running,
                         disks={t: FakeDisk(target=t, source=s) for t, s in disks.items()})
        self.domains[name] = dom
        return dom

    def disk(self, domain: str, target: str = "vda") -> FakeDisk:
        return self._domain(domain).disks[target]

    def emit(self, domain: str, target: str, event: JobEvent) -> None:
        for listener in list(self.listeners):
            listener(self._domain(domain).uuid, target, event)

    def emit_domain(self, domain: str) -> None:
        """A lifecycle or device event of ``domain`` (or "" after a reconnection)."""
        uuid = self._domain(domain).uuid if domain else ""
        for listener in list(self.domain_listeners):
            listener(uuid)

    def progress(self, domain: str, target: str = "vda", *, cur: int, end: int) -> None:
        job = self.disk(domain, target).job
        assert job is not None
        job.cur, job.end = cur, end

    def make_ready(self, domain: str, target: str = "vda", *, emit: bool = True) -> None:
        job = self.disk(domain, target).job
        assert job is not None
        job.cur = job.end = max(job.end, self.disk(domain, target).size)
        job.ready = MirrorReady.READY
        if emit:
            self.emit(domain, target, JobEvent.READY)

    def fail_job(self, domain: str, target: str = "vda") -> None:
        """QEMU gave up (say the destination filled up): the job is gone, FAILED emitted."""
        self.disk(domain, target).job = None
        self.emit(domain, target, JobEvent.FAILED)

    def verbs(self) -> list[str]:
        return [verb for _, verb, _ in self.calls]

    def times(self, verb: str) -> list[float]:
        return [t for t, v, _ in self.calls if v == verb]

    # -- the interface -----------------------------------------------------------------
    def add_listener(self, listener: JobListener) -> None:
        self.listeners.append(listener)

    def add_domain_listener(self, listener: DomainListener) -> None:
        self.domain_listeners.append(listener)

    async def _enter(self, verb: str, *args: Any) -> None:
        self.calls.append((asyncio.get_running_loop().time(), verb, args))
        await asyncio.sleep(0)  # a real call yields to the loop (it runs in a thread)
        hook = self.on_call.get(verb)
        if hook is not None:
            hook()
        if self.unreachable:
            raise HypervisorUnavailable("cannot connect to libvirt at fake:///: refused")
        if self.refusals.get(verb):
            self.refusals[verb] -= 1
            raise HypervisorError(f"fault injection: {verb} refused")

    def _domain(self, ref: str) -> FakeDomain:
        try:  # as libvirt reads a UUID: in any case, with or without its hyphens
            ref = str(uuidlib.UUID(ref))
        except ValueError:
            pass
        for dom in self.domains.values():
            if ref in (dom.name, dom.uuid):
                return dom
        raise HypervisorError(f"domain {ref!r} not found")

    def _job(self, domain: str, target: str, missing: str | None = None) -> FakeJob:
        """The job on ``target``; libvirt's error (or ``missing``) when there is none."""
        job = self._domain(domain).disks[target].job
        if job is None:
            raise HypervisorError(missing or f"No active block job '{target}'")
        return job

    async def version(self) -> str:
        await self._enter("version")
        return "9.0.0"

    async def has_running_domain(self, domain: str) -> bool:
        await self._enter("has_running_domain", domain)
        try:
            return self._domain(domain).running
        except HypervisorError:
            return False

    async def observe(self, domain: str, disk: str) -> DiskState:
        await self._enter("observe", domain, disk)
        try:
            dom = self._domain(domain)
        except HypervisorError:
            return DiskState(domain_found=False)
        found = next((d for d in dom.disks.values() if disk in (d.target, d.source)), None)
        info = job = None
        if found is not None:
            mirror = None
            if found.job is not None:
                mirror = Mirror(dest=found.job.dest, ready=found.job.ready)
                job = JobProgress(cur=found.job.cur, end=found.job.end,
                                  bandwidth=found.job.bandwidth)
            info = DiskInfo(target=found.target, source=found.source,
                            source_format=found.format,
                            backing=found.chain[0] if found.chain else found.backing,
                            mirror=mirror, chain=found.chain,
                            chain_formats=found.chain_formats or ("qcow2",) * len(found.chain),
                            encryption=found.encryption)
        return DiskState.of_domain(uuid=dom.uuid, name=dom.name, running=dom.running,
                                   persistent=dom.persistent, disk=info,
                                   job=job if dom.running else None)

    async def start_copy(self, request: CopyRequest) -> None:
        await self._enter("start_copy", request)
        disk = self._domain(request.domain).disks[request.target]
        if disk.job is not None:
            raise HypervisorError(f"block copy still active: disk '{request.target}' already "
                                  "in active block job")
        disk.job = FakeJob(dest=request.dest, request=request, bandwidth=request.bandwidth)
        # libvirt creates a new destination file (QEMU writes it from then on).
        if request.network is None and not request.block_device and \
                Flag.REUSE_EXTERNAL not in request.flags and \
                os.path.isdir(os.path.dirname(request.dest)):
            with open(request.dest, "ab"):
                pass

    async def pivot(self, domain: str, target: str) -> None:
        await self._enter("pivot", domain, target)
        job = self._job(domain, target)
        if job.ready != MirrorReady.READY:
            raise HypervisorError(f"block copy still active: disk '{target}' not ready for pivot")
        disk = self._domain(domain).disks[target]
        disk.source, disk.format, disk.job = job.dest, job.request.format, None
        self.emit(domain, target, JobEvent.COMPLETED)

    async def cancel(self, domain: str, target: str) -> None:
        await self._enter("cancel", domain, target)
        self._job(domain, target)
        self._domain(domain).disks[target].job = None
        self.emit(domain, target, JobEvent.CANCELED)

    async def image_users(self) -> list[ImageUser]:
        await self._enter("image_users")
        users = []
        for dom in self.domains.values():
            for disk in dom.disks.values():
                common: dict[str, Any] = {"domain": dom.name, "uuid": dom.uuid,
                                          "target": disk.target, "running": dom.running}
                users.append(ImageUser(path=disk.source, chain_known=dom.running, **common))
                if dom.running:
                    users.extend(ImageUser(path=p, backing=True, **common) for p in disk.chain)
        return users

    async def inventory(self, *, fresh_sizes: bool = False) -> list[InventoryDomain]:
        """As libvirt shows it: a stopped domain's definition has no backing chain. (Sizes
        are always the current ones: ``fresh_sizes`` is only recorded.)"""
        await self._enter("inventory", fresh_sizes)
        out = []
        for dom in self.domains.values():
            disks = tuple(InventoryDisk(
                target=d.target, type=DiskType.FILE, source=d.source, format=d.format,
                virtual_size=d.size, allocation=d.allocation,
                backing_chain=tuple(BackingImage(p, f or None) for p, f in
                                    zip(d.chain, d.chain_formats or ("",) * len(d.chain),
                                        strict=True)) if dom.running else ())
                for d in dom.disks.values())
            out.append(InventoryDomain(dom.name, dom.uuid, DomainState.RUNNING if dom.running
                                       else DomainState.STOPPED, disks))
        return out

    async def set_bandwidth(self, domain: str, target: str, bandwidth: int) -> None:
        await self._enter("set_bandwidth", domain, target, bandwidth)
        self._job(domain, target).bandwidth = bandwidth

    async def disk_size(self, domain: str, target: str) -> DiskSize:
        await self._enter("disk_size", domain, target)
        disk = self._domain(domain).disks[target]
        return DiskSize(capacity=disk.size, allocation=disk.allocation)

    capabilities_value: Capabilities | None = None  # set to pretend another hypervisor

    async def capabilities(self) -> Capabilities:
        await self._enter("capabilities")
        return self.capabilities_value or Capabilities(libvirt=(9, 0, 0), qemu=(7, 2, 0))

    async def set_copy_mode(self, domain: str, target: str, mode: str) -> None:
        await self._enter("set_copy_mode", domain, target, mode)
        self._job(domain, target, f"no mirror job of {target} in QEMU").copy_mode = mode

    async def set_zero_detection(self, domain: str, target: str, *, on: bool,
                                 mirror: bool) -> None:
        await self._enter("set_zero_detection", domain, target, on, mirror)
        disk = self._domain(domain).disks[target]
        if mirror and disk.job is None:
            raise HypervisorError(f"zero detection: disk {target} has no mirror source index")
        disk.zero_detection = on

    async def quiesce(self, domain: str) -> str:
        await self._enter("quiesce", domain)
        dom = self._domain(domain)
        dom.running = dom.running  # no guest agent here: suspended
        self.suspended.add(domain)
        return "suspended"

    async def unquiesce(self, domain: str, how: str) -> None:
        await self._enter("unquiesce", domain, how)
        self.suspended.discard(domain)

    async def pause(self, domain: str, owner: str) -> bool:
        await self._enter("pause", domain, owner)
        domain = self._domain(domain).name  # one VM, whether named or given by its uuid
        if domain in self.paused:
            return self.paused[domain] == owner
        self.paused[domain] = owner
        return True

    async def resume(self, domain: str, owner: str) -> None:
        await self._enter("resume", domain, owner)
        domain = self._domain(domain).name
        if domain in self.paused and self.paused[domain] == owner:
            del self.paused[domain]

    async def resume_left_paused(self, owner: str) -> list[str]:
        await self._enter("resume_left_paused", owner)
        resumed = sorted(d for d, who in self.paused.items() if who == owner)
        for domain in resumed:
            del self.paused[domain]
        return resumed

    async def job_progress(self, domain: str, target: str) -> JobProgress | None:
        await self._enter("job_progress", domain, target)
        job = self._domain(domain).disks[target].job
        return None if job is None else JobProgress(cur=job.cur, end=job.end,
                                                    bandwidth=job.bandwidth)

    async def flush_images(self, domain: str) -> None:
        await self._enter("flush_images", domain)

    async def close(self) -> None:
        self.closed = True


class FakeImages:
    """``ports.Images`` without qemu-img: files are created as small markers (so that the
    agent's existence checks see them), every call is recorded, faults can be injected."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.sizes: dict[str, int] = {}  # path -> virtual size (default 64 MiB)
        self.export_sizes: dict[str, int] = {}  # NBD URI -> size
        self.fail: dict[str, str] = {}  # verb -> message of the ImageError it raises
        self.differ: set[str] = set()  # images that do not compare identical to their copy
        self.chains: dict[str, list[str]] = {}  # path -> its backing images (stopped domains)
        self.encrypted: set[str] = set()  # images qemu-img info calls encrypted (LUKS)
        # The guest views the checks at the switch read (an image not here cannot be read).
        self.views: dict[str, bytearray] = {}
        self.read_delay = 0.0  # s each read_blocks takes

    def _view(self, path: str) -> bytearray:
        if path not in self.views:
            raise ImageError(f"cannot open {path}: No such file or directory")
        return self.views[path]

    async def data_map(self, path: str, *, format: str) -> DataMap:
        self._enter("data_map", path, format)
        view = self._view(path)
        return DataMap(size=len(view), data=((0, len(view)),))

    async def read_blocks(self, path: str, *, format: str, offsets: Sequence[int],
                          length: int) -> list[bytes]:
        self._enter("read_blocks", path, format, len(offsets))
        await asyncio.sleep(self.read_delay)
        view = self._view(path)
        return [bytes(view[off:off + length]) for off in offsets]

    async def compare_in_use(self, a: str, b: str, *, format_a: str, format_b: str,
                             timeout: float) -> str | None:
        self._enter("compare_in_use", a, b, timeout)
        va, vb = self._view(a), self._view(b)
        first = next((i for i, (x, y) in enumerate(zip(va, vb, strict=False)) if x != y), None)
        if first is None and len(va) == len(vb):
            return None
        return f"Content mismatch at offset {first if first is not None else len(va)}!"

    def _enter(self, verb: str, *args: Any) -> None:
        self.calls.append((verb, args))
        if verb in self.fail:
            raise ImageError(f"qemu-img {verb} failed: {self.fail[verb]}")

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.calls]

    async def info(self, path: str) -> ImageInfo:
        self._enter("info", path)
        return ImageInfo(format="qcow2", virtual_size=self.sizes.get(path, 64 << 20),
                         actual_size=0, encrypted=path in self.encrypted)

    async def create(self, path: str, *, format: str, size: int, backing: str | None = None,
                     backing_format: str | None = None) -> None:
        self._enter("create", path, format, size, backing, backing_format)
        with open(path, "w") as f:
            f.write(f"fake {format} image backed by {backing}\n")

    async def rebase(self, path: str, *, backing: str, backing_format: str) -> None:
        self._enter("rebase", path, backing, backing_format)

    async def copy_layer(self, source: str, dest: str, *, format: str,
                         backing: str | None = None, backing_format: str | None = None) -> None:
        await asyncio.sleep(1)  # a copy takes (loop) time
        self._enter("copy_layer", source, dest, format, backing, backing_format)

    async def identical(self, a: str, b: str, *, format: str) -> str | None:
        self._enter("identical", a, b, format)
        return "Content mismatch at offset 0!" if a in self.differ else None

    async def backing_chain(self, path: str) -> list[str]:
        self._enter("backing_chain", path)
        return list(self.chains.get(path, []))

    async def backing_images(self, path: str) -> list[BackingImage]:
        self._enter("backing_images", path)
        return [BackingImage(p, "qcow2") for p in self.chains.get(path, [])]

    async def export_size(self, uri: str) -> int:
        self._enter("export_size", uri)
        if uri not in self.export_sizes:
            raise ImageError(f"qemu-img info failed: Could not open '{uri}'")
        return self.export_sizes[uri]


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch, as the API server applies a merge-patch+json body."""
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_patch(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


@dataclasses.dataclass
class RecordedEvent:
    namespace: str
    name: str
    type: str
    reason: str
    message: str


class FakeKube:
    """``model.kubeapi.Kube`` in memory: objects by (namespace, name), with resourceVersions."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.status_writes: list[tuple[float, str, dict[str, Any]]] = []  # (time, name, body)
        self.events: list[RecordedEvent] = []
        self.failing = 0  # the next N status patches raise (API outage)
        self.failing_lists = 0  # the next N list_namespace calls raise
        self.unclaimed_queue: asyncio.Queue[dict[str, Any]] | None = None
        self.field_selectors = True  # False: refused, as by Kubernetes < 1.32
        self.unclaimed_calls: list[tuple[str | None, str | None]] = []  # (namespace, node)
        self.inventories: dict[str, dict[str, Any]] = {}  # DiskInventory name -> status
        self.inventory_writes: list[tuple[float, str]] = []  # (loop time, name)
        self.failing_inventory = 0  # the next N inventory writes raise
        self._versions = itertools.count(1)
        self._created = itertools.count(0)  # objects made later sort later

    def add(self, name: str, spec: dict[str, Any], *, namespace: str = "ns",
            status: dict[str, Any] | None = None, labels: dict[str, str] | None = None,
            created: str | None = None) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{name}",
                             "generation": 1, "labels": dict(labels or {}),
                             "creationTimestamp": created or
                             f"2026-01-01T00:00:{next(self._created):02d}Z",
                             "resourceVersion": str(next(self._versions))},
                "spec": dict(spec)}
        if status is not None:
            body["status"] = dict(status)
        self.objects[(namespace, name)] = body
        return body

    def status_of(self, name: str, namespace: str = "ns") -> dict[str, Any]:
        return self.objects[(namespace, name)].get("status") or {}

    def phases_written(self, name: str) -> list[str]:
        phases: list[str] = []
        for _, written, body in self.status_writes:
            phase = body.get("phase")
            if written == name and phase and (not phases or phases[-1] != phase):
                phases.append(phase)
        return phases

    def reasons(self, name: str) -> list[str]:
        return [e.reason for e in self.events if e.name == name]

    async def post_event(self, ref: ObjectRef, *, type: str, reason: str, message: str) -> None:
        self.events.append(RecordedEvent(ref.namespace, ref.name, type, reason, message))

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any], *,
                           resource_version: str | None = None) -> bool:
        await asyncio.sleep(0)
        if self.failing:
            self.failing -= 1
            raise ConnectionError("fault injection: the API server is down")
        body = self.objects.get((namespace, name))
        if body is None:
            return False
        if resource_version is not None and body["metadata"]["resourceVersion"] != \
                resource_version:
            return False
        # As the API server merges {"status": STATUS}: a null status deletes all of it.
        merged = merge_patch(body, {"status": status})
        body.pop("status", None)
        if "status" in merged:
            body["status"] = merged["status"]
        body["metadata"]["resourceVersion"] = str(next(self._versions))
        self.status_writes.append((asyncio.get_running_loop().time(), name,
                                   copy.deepcopy(status)))
        return True

    async def publish_inventory(self, name: str, status: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        if self.failing_inventory:
            self.failing_inventory -= 1
            raise ConnectionError("fault injection: the API server is down")
        self.inventories[name] = merge_patch(self.inventories.get(name) or {}, status)
        self.inventory_writes.append((asyncio.get_running_loop().time(), name))

    async def claim(self, namespace: str, name: str, *, node: str, resource_version: str,
                    finalizers: list[str]) -> bool:
        body = self.objects.get((namespace, name))
        if body is None or body["metadata"]["resourceVersion"] != resource_version:
            return False
        body["metadata"]["labels"][NODE_LABEL] = node
        body["metadata"]["finalizers"] = list(finalizers)
        body["metadata"]["resourceVersion"] = str(next(self._versions))
        return True

    async def list_namespace(self, namespace: str) -> list[dict[str, Any]]:
        await asyncio.sleep(0)
        if self.failing_lists:
            self.failing_lists -= 1
            raise ConnectionError("fault injection: the API server is down")
        return [copy.deepcopy(b) for (ns, _), b in self.objects.items() if ns == namespace]

    async def unclaimed(self, namespace: str | None, *, node_name: str | None, timeout: int
                        ) -> AsyncIterator[dict[str, Any]]:
        """As the API server filters: no claim label, and spec.nodeName equal to ``node_name``
        (an absent field reads as ""), unless ``node_name`` is None. With
        ``field_selectors`` False, a field selector is refused as by Kubernetes < 1.32."""
        self.unclaimed_calls.append((namespace, node_name))
        await asyncio.sleep(0)
        if node_name is not None and not self.field_selectors:
            raise FieldSelectorUnsupported(
                f"spec.nodeName={node_name}: 400 Bad Request: field label not supported")
        for (ns, _), body in list(self.objects.items()):
            if (namespace is None or ns == namespace) and \
                    NODE_LABEL not in body["metadata"]["labels"] and \
                    node_name in (None, str(body["spec"].get("nodeName") or "")):
                yield copy.deepcopy(body)
        await asyncio.sleep(timeout)


class Stop:
    """A stop signal like kopf's DaemonStopped."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


if TYPE_CHECKING:
    # mypy checks the fakes against the agent's interfaces (a fake that drifts from its
    # Protocol fails `make lint`, not a test run far away).
    _hypervisor: Hypervisor = FakeHypervisor()
    _images: Images = FakeImages()
    _kube: Kube = FakeKube()
