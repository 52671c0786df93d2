"""Source retention (``spec.deleteSourcesUnder``, set by BlockCopyPlans with
``sourceRetention: Delete``): once a copy has pivoted, the images of the disk's old chain
(its active image when the job started, and that image's backing files) that lie under the
given directory and that no domain of the node uses any more (running or not, live or
persistent definition; a backing file another VM shares is in use) are deleted. Never
anything else: not a file outside the directory, not a block device, not an image of another
chain. Done once (``status.reclaimedSources`` says what was deleted and what was kept, and
why); a restarted agent does it if the previous one did not get to it."""

from __future__ import annotations

import asyncio
import logging
import posixpath
from collections.abc import Mapping
from typing import Any

from blockcopy.agent.inuse import ImageUsers
from blockcopy.core.paths import within
from blockcopy.model.api import BlockCopySpec
from blockcopy.model.ports import Files, ImageError, Images

log = logging.getLogger(__name__)


async def reclaim(spec: BlockCopySpec, status: Mapping[str, Any], *, images: Images,
                  files: Files, in_use: ImageUsers) -> dict[str, Any] | None:
    """status.reclaimedSources ({"deleted": [...], "kept": [...]}) after deleting what may
    go; None when there is nothing to do (no retention asked, or done already)."""
    prefix = spec.delete_sources_under
    top = status.get("source")
    if not prefix or "reclaimedSources" in status or not isinstance(top, str):
        return None
    root = files.resolve(posixpath.normpath(prefix))
    chain = [top]
    try:
        if files.exists(top):
            chain += await images.backing_chain(top)
    except ImageError as exc:
        return {"deleted": [], "kept": [f"{top}: its backing chain cannot be read ({exc})"]}
    candidates = [p for p in chain if within(files.resolve(p), root)]
    kept = [f"{p}: not under {prefix}" for p in chain if p not in candidates]
    holders = await in_use.holders(candidates)
    deleted = []
    for path in candidates:
        user = holders.get(path)
        if user is not None:
            kept.append(f"{path}: used by domain {user.domain} ({user.target})")
        elif not files.exists(path):
            kept.append(f"{path}: already gone")
        elif files.is_block_device(path):
            kept.append(f"{path}: a block device (never deleted)")
        else:
            try:
                await asyncio.to_thread(files.delete, path)
            except OSError as exc:
                kept.append(f"{path}: cannot delete: {exc}")
                continue
            log.info("deleted source image %s (no domain uses it)", path)
            deleted.append(path)
    return {"deleted": deleted[:64], "kept": kept[:64]}


def summary(done: Mapping[str, Any]) -> str:
    return (f"deleted {len(done['deleted'])} source image(s), kept {len(done['kept'])}"
            + (f": {'; '.join(done['kept'][:5])}" if done["kept"] else ""))
