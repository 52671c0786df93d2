"""The API's names as the plugin uses them."""

from __future__ import annotations

from blockcopy.model.api import GROUP, PLURAL, TERMINAL_PHASES, Phase

# Also written as a label, so that a group can be selected on any server (a label is never
# pruned; spec.group is dropped by an API server whose CRD predates it).
GROUP_LABEL = f"{GROUP}/group"
RESOURCE = f"{PLURAL}.{GROUP}"  # as kubectl prints it: blockcopies.blockcopy.dev/NAME

# Every phase of the API, Queued included (it may be newer than this package's api module).
PHASES: tuple[str, ...] = tuple(dict.fromkeys(
    [Phase.PENDING.value, "Queued", *(p.value for p in Phase)]))
TERMINAL = frozenset(p.value for p in TERMINAL_PHASES)
