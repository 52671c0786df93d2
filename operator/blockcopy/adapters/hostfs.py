"""The host's file system through libvirt, for an agent that may not write it itself.

The chart mounts the allowed roots read-only and gives the agent no capability to write or
chown there (libvirt's QEMU writes the images, not the agent). Two things the agent does
write would then fail with EROFS: the missing directories of a destination
(spec.createDirectories, so every plan's children) and the deletion of source images no
domain uses (a plan's ``sourceRetention: Delete``). The libvirt daemon that writes the images
can do both, through storage pools of type ``dir``:

- a directory: a transient pool whose target it is, created with
  ``VIR_STORAGE_POOL_CREATE_WITH_BUILD`` (libvirt makes it with the owner, group and mode
  given, or sets them on one that exists), then stopped at once (stopping a transient pool
  removes the pool, never its directory);
- a file: a volume of a pool over its directory (a transient one, or the active pool that
  already has that directory as its target), deleted with ``virStorageVolDelete``.

The agent asks this only after its own attempt was refused; the checks of what may be made or
deleted are the agent's, made before."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from xml.sax.saxutils import escape

import libvirt

log = logging.getLogger(__name__)


class LibvirtHostFiles:
    """``make_directory`` and ``delete`` through the libvirt daemon at ``uri``; both raise
    OSError with libvirt's message when it cannot."""

    def __init__(self, uri: str, *,
                 open_connection: Callable[[str], libvirt.virConnect] = libvirt.open):
        self.uri = uri
        self._open = open_connection
        # One at a time: two transient pools over one directory would collide.
        self._lock = threading.Lock()

    @contextmanager
    def _connection(self) -> Iterator[libvirt.virConnect]:
        with self._lock:
            try:
                conn = self._open(self.uri)
            except libvirt.libvirtError as exc:
                raise OSError(f"libvirt at {self.uri}: {exc}") from exc
            try:
                yield conn
            finally:
                conn.close()

    def make_directory(self, path: str, uid: int, gid: int, mode: int) -> None:
        """Directory ``path`` (its parent exists) owned by uid:gid with ``mode`` (the
        permission bits only: libvirt takes no set-id or sticky bits)."""
        xml = _pool_xml(path, f"<permissions><mode>{mode & 0o777:04o}</mode><owner>{uid}"
                              f"</owner><group>{gid}</group></permissions>")
        with self._connection() as conn:
            try:
                pool = conn.storagePoolCreateXML(xml, libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
                pool.destroy()  # transient: the pool goes, the directory stays
            except libvirt.libvirtError as exc:
                raise OSError(f"libvirt could not make {path}: {exc}") from exc
        log.info("made %s through libvirt (%d:%d, mode %04o): this agent may not write there",
                 path, uid, gid, mode & 0o777)

    def delete(self, path: str) -> None:
        """Remove the file ``path``."""
        directory, name = os.path.split(path)
        with self._connection() as conn:
            try:
                try:
                    pool = conn.storagePoolCreateXML(_pool_xml(directory, ""), 0)
                    transient = True
                except libvirt.libvirtError:
                    # The directory is some pool's target already (libvirt refuses a second
                    # one): use that pool if it runs; another's stopped pool is not started.
                    pool = conn.storagePoolLookupByTargetPath(directory)
                    if not pool.isActive():
                        raise
                    pool.refresh(0)
                    transient = False
                try:
                    pool.storageVolLookupByName(name).delete(0)
                finally:
                    if transient:
                        pool.destroy()
            except libvirt.libvirtError as exc:
                raise OSError(f"libvirt could not delete {path}: {exc}") from exc
        log.info("deleted %s through libvirt: this agent may not write there", path)


def _pool_xml(path: str, permissions: str) -> str:
    name = f"blockcopy-{uuid.uuid4().hex[:12]}"
    return (f"<pool type='dir'><name>{name}</name><target><path>{escape(path)}</path>"
            f"{permissions}</target></pool>")
