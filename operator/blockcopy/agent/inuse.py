"""Who uses an image: before a copy writes a destination (and before every pivot), the agent
asks whether any domain of the node (running or not, its live or persistent definition, a
storage volume) has that file as a disk image or a backing image. libvirt does not ask:
QEMU locks only the images of running domains, so a stopped VM's disk (or a backing file
shared by another VM's chain) would be overwritten, and the copying VM pivoted onto it.

A match is the same file (device and inode, after symlinks and hard links) or, for a path
where nothing exists yet, the same resolved path. A stopped domain's definition names its
active image only: its backing chain is read from the image header (qemu-img, shared)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from blockcopy.core import destinations
from blockcopy.model.observation import FileIdentity, ImageUser
from blockcopy.model.ports import Files, Hypervisor, ImageError, Images

log = logging.getLogger(__name__)


class ImageUsers:
    def __init__(self, *, hv: Hypervisor, images: Images, files: Files):
        self.hv, self.images, self.files = hv, images, files

    async def holder(self, path: str, *, exclude: tuple[str | None, str | None] = (None, None)
                     ) -> ImageUser | None:
        """The first domain disk that uses ``path`` (as its image or a backing image), not
        counting the disk ``exclude`` = (domain uuid, target) itself."""
        holders = await self.holders([path], exclude=exclude)
        return holders.get(path)

    async def holders(self, paths: Sequence[str], *,
                      exclude: tuple[str | None, str | None] = (None, None)
                      ) -> dict[str, ImageUser]:
        """For each of ``paths`` that a domain's disk uses: that disk."""
        users = [u for u in await self.hv.image_users() if (u.uuid, u.target) != exclude]
        wanted = await asyncio.to_thread(self._identify, list(paths))
        if any(identity is not None for _, identity in wanted.values()):
            users = users + await self._stopped_chains(users)
        known = await asyncio.to_thread(self._identify, [u.path for u in users])
        found: dict[str, ImageUser] = {}
        for path, (resolved, identity) in wanted.items():
            for user in users:
                user_resolved, user_identity = known[user.path]
                if destinations.same_image(resolved, identity, user_resolved, user_identity):
                    found[path] = user
                    break
        return found

    def _identify(self, paths: list[str]) -> dict[str, tuple[str, FileIdentity | None]]:
        out: dict[str, tuple[str, FileIdentity | None]] = {}
        for path in paths:
            if path in out:
                continue
            try:
                identity = self.files.identity(path)
            except OSError:
                identity = None  # cannot look: compared by path only
            out[path] = (self.files.resolve(path), identity)
        return out

    async def _stopped_chains(self, users: list[ImageUser]) -> list[ImageUser]:
        """The backing images of the images whose chain libvirt does not show."""
        found: list[ImageUser] = []
        for user in users:
            if user.chain_known or user.backing or "://" in user.path:
                continue
            try:
                chain = await self.images.backing_chain(user.path)
            except ImageError as exc:  # missing or unreadable: it opens nothing more
                log.info("cannot read the backing chain of %s (%s): %s", user.path,
                         user.domain, exc)
                continue
            found.extend(ImageUser(path=p, domain=user.domain, uuid=user.uuid,
                                   target=user.target, running=user.running,
                                   definition=user.definition, backing=True,
                                   tenant=user.tenant) for p in chain)
        return found
