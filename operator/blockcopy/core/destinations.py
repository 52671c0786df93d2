"""Guarantees about the destination that libvirt does not give, as pure rules: it is not an
image another domain uses (``DestInUse``), and at the pivot it is still the file the copy
was started onto (``DestVanished``, ``DestReplaced``, ``DestUnreadable``). The agent gathers
the facts (``agent.inuse``, ``model.ports.Files.identity``) and asks these."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from blockcopy.core.reconcile import Action, Decision
from blockcopy.model.api import Phase
from blockcopy.model.observation import FileIdentity, ImageUser

INTACT = "DestinationIntact"  # condition: False (with the reason) while the pivot is held


def same_image(path: str, identity: FileIdentity | None, other_path: str,
               other_identity: FileIdentity | None) -> bool:
    """The same image: the same file (device and inode, or block device), or, where nothing
    can be looked at, the same resolved path."""
    if identity is not None and other_identity is not None:
        return identity.same(other_identity)
    return path == other_path


def describe_user(user: ImageUser, *, visible: bool) -> str:
    role = "a backing image" if user.backing else "the image"
    state = "running" if user.running else "not running"
    if not visible:
        return f"{role} of a disk of another domain on this node"
    where = " (its persistent definition)" if user.definition == "persistent" and \
        user.running else ""
    return f"{role} of disk {user.target} of domain {user.domain!r} ({state}){where}"


def in_use(dest: str, user: ImageUser, *, visible: bool, what: str = "dest") -> Decision:
    """Refused before anything is written: ``dest`` is an image another disk uses."""
    return Decision(Phase.FAILED, reason="DestInUse",
                    message=f"{what} {dest} is {describe_user(user, visible=visible)}: a copy "
                    "would overwrite it and the VM would then share it; nothing was started")


@dataclasses.dataclass(frozen=True)
class DestCheck:
    """The destination as seen right before a pivot: what it was when the job started,
    what it is now (None: nothing there), why it could not be looked at, and which other
    disk uses it now, if any."""

    recorded: FileIdentity | None
    now: FileIdentity | None
    error: str | None = None
    user: ImageUser | None = None
    visible: bool = True  # may the object's namespace see the user's domain


def held(dest: str, check: DestCheck) -> tuple[str, str] | None:
    """(reason, message) when the pivot must not happen onto ``dest``, else None."""
    if check.error is not None:
        return ("DestUnreadable", f"cannot look at dest {dest} before the pivot "
                f"({check.error}); the VM stays on its source: fix it and the pivot goes on, "
                "or set spec.abort")
    if check.now is None:
        return ("DestVanished", f"dest {dest} is gone (deleted, or its file system "
                "re-mounted) since the copy started: the VM would run on a file without a "
                "name and lose every write at its next stop. It stays on its source; set "
                "spec.abort and start the copy again")
    if check.recorded is not None and not check.recorded.same(check.now):
        return ("DestReplaced", f"dest {dest} is another file now ({check.now.describe()}, "
                f"the copy went to {check.recorded.describe()}): replaced or re-mounted since "
                "the copy started. The VM stays on its source; set spec.abort and start the "
                "copy again")
    if check.user is not None:
        user = describe_user(check.user, visible=check.visible)
        return ("DestInUse", f"dest {dest} is now {user}; the VM stays on its source: set "
                "spec.abort")
    return None


def guard(decision: Decision, dest: str, check: DestCheck | None, *,
          previous: Sequence[Mapping[str, Any]] | None) -> tuple[Decision, list[dict[str, str]]]:
    """Hold a pivot whose destination is no longer the copy's (the phase stays Mirrored),
    and the DestinationIntact condition: False with the reason while something is wrong,
    True once looked at and found right; as it was when not looked at this time."""
    if check is None:
        kept = next((c for c in previous or () if c.get("type") == INTACT), None)
        return decision, [{k: str(kept[k]) for k in ("type", "status", "reason", "message")}] \
            if kept else []
    problem = held(dest, check)
    if problem is None:
        return decision, [{"type": INTACT, "status": "True", "reason": "Checked",
                           "message": f"dest {dest} is the file the copy went to"}]
    reason, message = problem
    condition = {"type": INTACT, "status": "False", "reason": reason, "message": message}
    if decision.action != Action.PIVOT:
        return decision, [condition]
    return Decision(Phase.MIRRORED, reason=reason, message=message, warning=True), [condition]


def was_held(previous: Sequence[Mapping[str, Any]] | None, reason: str) -> bool:
    """The condition already said so (its Event was posted then)."""
    return any(c.get("type") == INTACT and c.get("status") == "False" and
               c.get("reason") == reason for c in previous or ())
