"""The node's file system, for the checks on a destination made before libvirt is called
(``model.ports.Files``): the agent must not let a BlockCopy write arbitrary files on the node,
clobber an existing file, or start a copy that cannot fit. Paths are resolved like the kernel
would (symlinks, ``..``) before they are compared."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterable, Sequence

from blockcopy.core.paths import within
from blockcopy.model.api import BlockCopySpec, Flag
from blockcopy.model.observation import FileIdentity
from blockcopy.model.ports import CONTAINER_DEVICE_HINT, Refusal


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def probe_format(path: str) -> str:
    """Image format of an existing destination: qcow2 by its magic, otherwise raw."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def chain_member(dest: str, images: Iterable[str | None]) -> str | None:
    """The image of the source's chain (the active image included) that ``dest`` is, after
    symlinks and ``..``, or None. Copying into one's own chain, even with reuseExternal,
    would have QEMU write the data over the image it reads it from."""
    resolved = os.path.realpath(dest)
    for image in images:
        if image is None:
            continue
        if os.path.realpath(image) == resolved:
            return image
        try:
            if os.path.exists(dest) and os.path.samefile(dest, image):
                return image  # a hard link or bind mount of the image
        except OSError:
            continue
    return None


def refusal(spec: BlockCopySpec, allowed_roots: Iterable[str]) -> tuple[str, str] | None:
    """(reason, message) if the destination must not be used, else None.

    ``dest`` is resolved like the kernel would (symlinks, ``..``) and must land under an
    allowed root, itself resolved the same way.
    """
    resolved = os.path.realpath(spec.dest)
    roots = [os.path.realpath(r) for r in allowed_roots]
    if not any(within(resolved, root) for root in roots):
        shown = spec.dest if resolved == spec.dest else f"{spec.dest} (resolves to {resolved})"
        return ("DestNotAllowed", f"dest {shown} is outside the allowed paths "
                f"{', '.join(roots)}; see the agent's --allowed-path")
    exists = os.path.lexists(spec.dest)
    reuse = Flag.REUSE_EXTERNAL in spec.flags
    if exists and not reuse:
        return ("DestExists", f"dest {spec.dest} already exists; set the reuseExternal flag to "
                "copy into a pre-created destination (it is never overwritten otherwise)")
    if reuse and not exists:
        return ("DestMissing", f"dest {spec.dest} does not exist, but the reuseExternal flag "
                "says it was pre-created")
    if not exists and not os.path.isdir(os.path.dirname(resolved)):
        return ("DestNotCreatable", f"cannot create dest {spec.dest}: directory "
                f"{os.path.dirname(resolved)} does not exist")
    if exists and not (is_block_device(resolved) or os.path.isfile(resolved)):
        return ("DestNotFileOrDevice", f"dest {spec.dest} is neither a file nor a block device")
    return None


# (path, uid, gid, mode): makes one directory by other means (adapters.hostfs: libvirt).
MakeDirectory = Callable[[str, int, int, int], None]
# (path): deletes one file by other means (adapters.hostfs: libvirt).
DeleteFile = Callable[[str], None]
# Why the agent's own mkdir, chown or chmod may fail where libvirt's would not: the chart's
# read-only mounts of the allowed roots, and its container without CAP_CHOWN/DAC_OVERRIDE.
_NOT_OURS_TO_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _make_like(directory: str, st: os.stat_result, fallback: MakeDirectory | None) -> None:
    """``directory`` made with the owner, group and mode of ``st``: here, else by ``fallback``
    when the file system refuses this process."""
    try:
        if not os.path.isdir(directory):
            os.mkdir(directory, 0o700)
        os.chown(directory, st.st_uid, st.st_gid)
        os.chmod(directory, stat.S_IMODE(st.st_mode))
    except OSError as exc:
        if fallback is None or exc.errno not in _NOT_OURS_TO_WRITE:
            raise
        fallback(directory, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        if not os.path.isdir(directory):
            raise OSError(errno.ENOENT, f"{directory} not made (here: {exc.strerror})") from exc


def make_directories(dest: str, source: str, allowed_roots: Iterable[str], *,
                     fallback: MakeDirectory | None = None
                     ) -> tuple[list[str], tuple[str, str] | None]:
    """See ``ports.Files.make_directories``; ``fallback`` makes a directory this process may
    not."""
    missing: list[tuple[str, str]] = []
    d, s = os.path.dirname(dest), os.path.dirname(source)
    while not os.path.lexists(d):
        if s in ("", "/") or d in ("", "/"):
            return [], ("DestNotCreatable", f"cannot create the directories of {dest}: the "
                        f"source {source} has no directory at the depth of {d}")
        missing.append((d, s))
        d, s = os.path.dirname(d), os.path.dirname(s)
    resolved = os.path.realpath(d)
    roots = [os.path.realpath(r) for r in allowed_roots]
    if not os.path.isdir(resolved) or not any(within(resolved, root) for root in roots):
        return [], ("DestNotAllowed", f"will not create directories below {d}: it is not a "
                    f"directory under the allowed paths {', '.join(roots)}")
    made: list[str] = []
    for directory, like in reversed(missing):
        try:
            _make_like(directory, os.stat(like), fallback)
            made.append(directory)
        except OSError as exc:
            return made, ("DestNotCreatable", f"cannot create {directory} like {like}: {exc}")
    return made, None


def allocated(path: str) -> int:
    """Bytes a file occupies on its storage (sparse files count their data only)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0




def device_size(path: str) -> int:
    """Bytes of a block device: from sysfs when it is there, which needs no access to the
    device itself (an agent in a container may not open it: see CONTAINER_DEVICE_HINT),
    else by seeking to its end."""
    rdev = os.stat(path).st_rdev
    try:
        with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/size") as f:
            return int(f.read()) * 512  # sysfs counts 512-byte sectors, whatever the device's
    except (OSError, ValueError):
        pass
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def space_refusal(dest: str, *, required: int, capacity: int, reuse: bool,
                  network_size: int | None = None,
                  basis: str = "the data allocated in the images it copies"
                  ) -> tuple[str, str] | None:
    """(reason, message) if ``dest`` cannot hold the copy, checked before libvirt is called:
    the exact size of a block device or network export, or the free space of the file
    system that will hold a file (``required`` bytes of data to write, counted as
    ``basis`` says)."""
    if network_size is not None:
        if network_size < capacity:
            return ("DestNoSpace", f"the NBD export {dest} holds {network_size} bytes, the disk "
                    f"{capacity}: it cannot hold the copy")
        if network_size != capacity:
            return ("DestSizeMismatch", f"the NBD export {dest} holds {network_size} bytes, the "
                    f"disk {capacity}: QEMU mirrors only onto a target of the same size")
        return None
    resolved = os.path.realpath(dest)
    if is_block_device(resolved):
        try:
            size = device_size(resolved)
        except OSError as exc:
            return ("DestUnreadable", f"cannot learn the size of block device {dest}: "
                    f"{exc.strerror}; {CONTAINER_DEVICE_HINT}")
        if size < capacity:
            return ("DestNoSpace", f"block device {dest} holds {size} bytes ({_mib(size)}), the "
                    f"disk {capacity} ({_mib(capacity)}): it cannot hold the copy")
        return None
    needed = max(0, required - (allocated(resolved) if reuse else 0))
    stat = os.statvfs(os.path.dirname(resolved))
    free = stat.f_bavail * stat.f_frsize
    if needed > free:
        return ("DestNoSpace", f"{os.path.dirname(resolved)} has {_mib(free)} free, the copy "
                f"needs about {_mib(needed)} ({basis}): nothing was started")
    return None


def network_refusal(endpoint: str, allowed: Iterable[str]) -> tuple[str, str] | None:
    """A network destination (HOST:PORT, or a socket path) must be allowed by the agent's
    configuration: it sends the VM's data off the host."""
    allowed = list(allowed)
    for entry in allowed:
        if entry == endpoint:
            return None
        if endpoint.startswith("/") and entry.startswith("/") and \
                within(os.path.realpath(endpoint), os.path.realpath(entry)):
            return None
    shown = ", ".join(allowed) or "none"
    return ("DestNotAllowed", f"network destination {endpoint} is not allowed on this node "
            f"(allowed: {shown}; see the agent's --allowed-network-dest)")


FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long): the inode's generation


def _generation(path: str) -> int | None:
    """The inode generation of a file (ext4, xfs, btrfs...), None where there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        buf = array.array("l", [0])
        fcntl.ioctl(fd, FS_IOC_GETVERSION, buf, True)
        return int(buf[0])
    except OSError:
        return None
    finally:
        os.close(fd)


class LocalFiles:
    """``model.ports.Files`` on this node's file system; ``make_directory`` and ``delete``
    do what the agent may not do itself (the chart's read-only roots: ``adapters.hostfs``)."""

    def __init__(self, *, make_directory: MakeDirectory | None = None,
                 delete: DeleteFile | None = None):
        self._make_directory, self._delete = make_directory, delete

    def resolve(self, path: str) -> str:
        return os.path.realpath(path)

    def refusal(self, spec: BlockCopySpec, allowed_roots: Sequence[str]) -> Refusal | None:
        return refusal(spec, allowed_roots)

    def network_refusal(self, endpoint: str, allowed: Sequence[str]) -> Refusal | None:
        return network_refusal(endpoint, allowed)

    def chain_member(self, dest: str, images: Sequence[str | None]) -> str | None:
        return chain_member(dest, images)

    def space_refusal(self, dest: str, *, required: int, capacity: int, reuse: bool,
                      network_size: int | None = None,
                      basis: str = "the data allocated in the images it copies"
                      ) -> Refusal | None:
        return space_refusal(dest, required=required, capacity=capacity, reuse=reuse,
                             network_size=network_size, basis=basis)

    def allocated(self, path: str) -> int:
        return allocated(path)

    def delete(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            if self._delete is None or exc.errno not in _NOT_OURS_TO_WRITE:
                raise
            self._delete(path)

    def make_directories(self, dest: str, source: str, allowed_roots: Sequence[str]
                         ) -> tuple[list[str], Refusal | None]:
        return make_directories(dest, source, allowed_roots, fallback=self._make_directory)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_block_device(self, path: str) -> bool:
        return is_block_device(path)

    def probe_format(self, path: str) -> str:
        return probe_format(path)

    def identity(self, path: str) -> FileIdentity | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISBLK(st.st_mode):
            return FileIdentity("block", st.st_dev, st.st_ino, st.st_rdev)
        if not stat.S_ISREG(st.st_mode):
            return FileIdentity("other", st.st_dev, st.st_ino)
        return FileIdentity("file", st.st_dev, st.st_ino, generation=_generation(path))
