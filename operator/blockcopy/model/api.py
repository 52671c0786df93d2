"""The BlockCopy API: names, phases, flags and the parsed spec. Pure: no I/O."""

from __future__ import annotations

import dataclasses
import enum
import math
import posixpath
from collections.abc import Mapping
from typing import Any, TypeVar

# NBD destinations and the spec's error live in model.nbd; re-exported here.
from blockcopy.model.nbd import NBD_DEFAULT_PORT as NBD_DEFAULT_PORT
from blockcopy.model.nbd import NetworkDest as NetworkDest
from blockcopy.model.nbd import SpecError as SpecError
from blockcopy.model.nbd import parse_network_dest as parse_network_dest

GROUP = "blockcopy.dev"
VERSION = "v1alpha1"
KIND = "BlockCopy"
PLURAL = "blockcopies"

# Label that records which node's agent owns an object (server-side selectable).
NODE_LABEL = "blockcopy.dev/node"
# The finalizer that makes deleting an object wait until its agent cancelled the job.
FINALIZER = f"{GROUP}/cancel-job"
# Where destinations may be written when the agent is given no --allowed-path.
DEFAULT_ALLOWED_PATHS = ("/var/lib/libvirt/images",)


class Phase(enum.StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"  # waiting for a free copy slot on its node (--max-active-copies)
    PREPARING = "Preparing"  # the agent prepares the destination (base, chain move)
    COPYING = "Copying"
    MIRRORED = "Mirrored"
    PIVOTING = "Pivoting"
    PIVOTED = "Pivoted"
    ABORTING = "Aborting"
    ABORTED = "Aborted"
    FAILED = "Failed"


TERMINAL_PHASES = frozenset({Phase.PIVOTED, Phase.ABORTED, Phase.FAILED})
# Phases in which a libvirt job of ours may exist on the disk.
JOB_PHASES = frozenset({Phase.COPYING, Phase.MIRRORED, Phase.PIVOTING, Phase.ABORTING})
# Phases before any job of ours exists (a restart in these decides afresh).
BEFORE_JOB_PHASES = frozenset({Phase.PENDING, Phase.QUEUED, Phase.PREPARING})


class Flag(enum.StrEnum):
    SHALLOW = "shallow"
    REUSE_EXTERNAL = "reuseExternal"
    TRANSIENT_JOB = "transientJob"
    SYNCHRONOUS_WRITES = "synchronousWrites"


class Convergence(enum.StrEnum):
    """spec.convergence: what the agent may do about a copy that does not converge."""

    AUTO = "auto"  # switch the running mirror to write-blocking (QEMU >= 8.2)


class Verify(enum.StrEnum):
    """spec.verify: what the agent checks of the copy at the switch, the guest paused."""

    NONE = "None"  # nothing: the pivot goes on as soon as libvirt says ready
    SAMPLE = "Sample"  # 1,024 blocks of the guest's view, source against destination
    FULL = "Full"  # every block (qemu-img compare): a pause of seconds per GiB


class BackingChain(enum.StrEnum):
    """spec.backingChain: what happens to the images below the active one."""

    COPY = "copy"  # move them too, next to dest (the oVirt flow, automated)


@dataclasses.dataclass(frozen=True)
class BlockCopySpec:
    domain: str
    disk: str
    dest: str
    node_name: str | None = None
    network: NetworkDest | None = None  # dest is an NBD export (dest holds its URI)
    backing_chain: BackingChain | None = None
    group: str | None = None  # a disk group (blockcopy.agent.groups)
    convergence: Convergence | None = None
    format: str | None = None
    base: str | None = None
    flags: frozenset[Flag] = frozenset()
    bandwidth: int = 0  # bytes/s, 0 = unlimited
    granularity: int = 0
    buf_size: int = 0
    pivot: bool = False
    abort: bool = False
    detect_zeroes: bool = True  # zeros the guest wrote are not copied as data
    # None (absent): Sample, but a copy that cannot be checked still pivots (NotVerified);
    # asked for explicitly, a check that cannot be made holds the pivot (NotVerifiable).
    verify: Verify | None = None
    # Missing directories of dest are made, each like the source's directory at its depth.
    create_directories: bool = False
    # After the pivot: the old chain's images under it that no domain uses are deleted.
    delete_sources_under: str | None = None


# Binary and decimal suffixes of Kubernetes quantities, for byte rates.
_QUANTITY_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "": 1,
}


def parse_bandwidth(value: Any) -> int:
    """A Kubernetes quantity (``100Mi``, ``5M``, ``1048576``) as whole bytes per second."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise SpecError(f"bandwidth must be a quantity such as 100Mi, not {value!r}")
    number: int | float
    if isinstance(value, int):
        number, multiplier = value, 1
    elif isinstance(value, str):
        text = value.strip()
        suffix = next((s for s in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True)
                       if s and text.endswith(s)), "")
        digits = text[: len(text) - len(suffix)] if suffix else text
        try:
            number = int(digits) if digits.isdigit() else float(digits)
        except ValueError:
            raise SpecError(f"bandwidth {value!r} is not a quantity such as 100Mi") from None
        multiplier = _QUANTITY_SUFFIXES[suffix]
    else:
        raise SpecError(f"bandwidth must be a quantity such as 100Mi, not {value!r}")
    if not math.isfinite(number) or number < 0:
        raise SpecError(f"bandwidth must be a finite, non-negative quantity: {value!r}")
    result = int(number * multiplier)
    if result >= 2**63:
        raise SpecError(f"bandwidth {value!r} is too large")
    return result


def _string(raw: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        if required:
            raise SpecError(f"spec.{key} is required")
        return None
    if not isinstance(value, str):
        raise SpecError(f"spec.{key} must be a string, not {type(value).__name__}")
    if "\x00" in value:
        raise SpecError(f"spec.{key} must not contain NUL characters")
    return value


def _non_negative_int(raw: Mapping[str, Any], key: str, limit: int = 2**63) -> int:
    value = raw.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"spec.{key} must be a non-negative integer, not {value!r}")
    if value < 0 or value >= 2**63:
        raise SpecError(f"spec.{key} must be a non-negative integer, not {value!r}")
    if value >= limit:
        raise SpecError(f"spec.{key} {value} is too large: libvirt takes at most {limit - 1}")
    return value


def _absolute(raw: Mapping[str, Any], key: str) -> str | None:
    value = _string(raw, key)
    if value is not None and (not posixpath.isabs(value) or posixpath.normpath(value) == "/"):
        raise SpecError(f"spec.{key} must be an absolute directory other than /, not {value!r}")
    return posixpath.normpath(value) if value is not None else None


def _bool(raw: Mapping[str, Any], key: str, *, default: bool = False) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SpecError(f"spec.{key} must be true or false, not {value!r}")
    return value


E = TypeVar("E", bound=enum.StrEnum)


def choice(raw: Mapping[str, Any], key: str, kind: type[E]) -> E | None:
    """spec.KEY as a member of ``kind`` (None when absent); SpecError naming the values."""
    value = _string(raw, key)
    try:
        return None if value is None else kind(value)
    except ValueError:
        raise SpecError(f"spec.{key} {value!r}: the values are "
                        f"{', '.join(repr(v.value) for v in kind)}") from None


def parse_spec(raw: Any) -> BlockCopySpec:
    """Validate a BlockCopy's spec as the agent needs it; raise SpecError with a clear message."""
    if not isinstance(raw, Mapping):
        raise SpecError("spec must be an object")
    domain = _string(raw, "domain", required=True)
    disk = _string(raw, "disk", required=True)
    dest = _string(raw, "dest", required=True)
    assert domain and disk and dest  # for the type checker: required above
    network = parse_network_dest(dest)
    if network is None:
        if not posixpath.isabs(dest):
            raise SpecError(f"spec.dest must be an absolute path or an NBD URI, not {dest!r}")
        if dest.endswith("/"):
            raise SpecError(f"spec.dest must name a file or block device, not a directory: "
                            f"{dest!r}")
        dest = posixpath.normpath(dest)
    fmt = _string(raw, "format")
    if fmt is not None and not fmt.replace("-", "").replace("_", "").isalnum():
        raise SpecError(f"spec.format {fmt!r} is not an image format name such as raw or qcow2")
    base = _string(raw, "base")
    if base is not None and not posixpath.isabs(base):
        raise SpecError(f"spec.base must be an absolute path, not {base!r}")

    raw_flags = raw.get("flags") or []
    if not isinstance(raw_flags, list):
        raise SpecError("spec.flags must be a list")
    flags = set()
    for item in raw_flags:
        try:
            flags.add(Flag(item))
        except ValueError:
            known = ", ".join(f.value for f in Flag)
            raise SpecError(f"unknown flag {item!r} in spec.flags; known flags: {known}") from None
    if base is not None and Flag.SHALLOW in flags:
        raise SpecError("spec.base and the shallow flag cannot be combined: shallow already "
                        "means base = the top image's backing file")
    chain_mode = _string(raw, "backingChain")
    backing_chain = None
    if chain_mode is not None:
        try:
            backing_chain = BackingChain(chain_mode)
        except ValueError:
            raise SpecError(f"spec.backingChain {chain_mode!r}: the only value is "
                            f"{BackingChain.COPY.value!r}") from None
        if base is not None or Flag.SHALLOW in flags or Flag.REUSE_EXTERNAL in flags:
            raise SpecError("spec.backingChain: copy moves the whole chain; it cannot be "
                            "combined with spec.base, shallow or reuseExternal")
        if network is not None:
            raise SpecError("spec.backingChain: copy needs a directory for the lower images; "
                            "a network destination has none")
        if fmt not in (None, "qcow2"):
            raise SpecError("spec.backingChain: copy writes qcow2 images (they have backing "
                            f"files); spec.format {fmt!r} cannot hold that")
    if network is not None:
        if fmt not in (None, "raw"):
            raise SpecError(f"spec.format {fmt!r}: a network destination is written raw "
                            "(libvirt does not probe network targets)")
        if base is not None or Flag.SHALLOW in flags:
            raise SpecError("a network destination takes a full copy: spec.base and shallow "
                            "would leave it pointing at backing files it cannot reach")
        fmt = "raw"
        if _bool(raw, "createDirectories"):
            raise SpecError("spec.createDirectories needs a path destination, not an NBD export")
    if base is not None and fmt not in (None, "qcow2"):
        raise SpecError(f"spec.base needs a qcow2 destination (it gets a backing file); "
                        f"spec.format {fmt!r} cannot hold one")

    return BlockCopySpec(
        domain=domain,
        disk=disk,
        dest=dest,
        network=network,
        backing_chain=backing_chain,
        group=_string(raw, "group"),
        convergence=choice(raw, "convergence", Convergence),
        node_name=_string(raw, "nodeName"),
        format=fmt,
        base=base,
        flags=frozenset(flags),
        bandwidth=parse_bandwidth(raw.get("bandwidth")),
        # libvirt's granularity parameter is an unsigned int (its binding cannot pass more).
        granularity=_non_negative_int(raw, "granularity", limit=2**32),
        buf_size=_non_negative_int(raw, "bufSize"),
        pivot=_bool(raw, "pivot"),
        detect_zeroes=_bool(raw, "detectZeroes", default=True),
        create_directories=_bool(raw, "createDirectories"),
        delete_sources_under=_absolute(raw, "deleteSourcesUnder"),
        abort=_bool(raw, "abort"),
        verify=choice(raw, "verify", Verify),
    )
