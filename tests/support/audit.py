"""The local API server's audit log (hack/cluster-up.sh: Metadata level for blockcopy.dev and
Events): who asked for what, and when a watch opened. The benchmark counts the operator's
requests in it; a test waits in it for a watch to open before asserting that the watcher
has not ended (a positive signal instead of a sleep)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable
from urllib.parse import parse_qs, urlsplit

from support.paths import STATE

AUDIT_LOG = STATE / "log" / "audit.log"


def size(path: pathlib.Path = AUDIT_LOG) -> int:
    """Where the log ends now: pass it to ``lines`` for what comes after."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def lines(path: pathlib.Path, offset: int) -> Iterable[str]:
    """The audit log from byte ``offset`` on (from its start, and its rotated file's, if it
    was rotated meanwhile)."""
    files = [path]
    if path.stat().st_size < offset:
        files = sorted(path.parent.glob("audit*.log"))
        offset = 0
    for file in files:
        with open(file) as f:
            f.seek(offset if file == path else 0)
            yield from f


def watch_opened(namespace: str, resource: str, *, field_selector: str, since: int,
                 path: pathlib.Path = AUDIT_LOG) -> bool:
    """A watch of ``resource`` in ``namespace`` with ``field_selector`` has its response
    started (the server sent its headers: events from then on reach the watcher), logged
    after byte ``since``."""
    for line in lines(path, since):
        if '"watch"' not in line or resource not in line:
            continue
        record = json.loads(line)
        ref = record.get("objectRef") or {}
        query = parse_qs(urlsplit(record.get("requestURI", "")).query)
        if (record.get("verb") == "watch" and record.get("stage") == "ResponseStarted"
                and ref.get("resource") == resource and ref.get("namespace") == namespace
                and query.get("fieldSelector") == [field_selector]):
            return True
    return False
