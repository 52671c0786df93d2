"""Every reason the operator writes (a condition's reason, an Event's reason, a failure
reason, a plan's per-disk state) is in the documentation users read: README.md or docs/, in
code style. A reason users see in `kubectl describe` and cannot look up is a contract
nobody wrote down."""

from __future__ import annotations

import re

from blockcopy.core import planning
from support.paths import ROOT

# reason="X", "reason": "X", failed("X", Refusal("X", return ("X", ...,
# event("Warning", "X", note_event("Normal", "X", _event(body, "Warning", "X"
WRITTEN = re.compile(r'(?:reason=|"reason":\s*|failed\(|Refusal\(|return \(|'
                     r'event\((?:\w+,\s*)?"(?:Normal|Warning)",\s*)"([A-Z][A-Za-z0-9]+)"')
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def reasons_in_the_code() -> set[str]:
    found = set()
    for path in (ROOT / "operator" / "blockcopy").rglob("*.py"):
        if "kubectl" not in path.parts:  # the plugin writes no status
            found |= set(WRITTEN.findall(path.read_text()))
    return found | {planning.CONFLICT, planning.VANISHED, planning.GROUP_FAILED,
                    planning.WAITING}


def documented() -> set[str]:
    text = "".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    return {word for span in CODE_SPAN.findall(text) for word in re.findall(r"\w+", span)}


def test_the_scan_sees_the_reasons():
    found = reasons_in_the_code()
    assert {"DestNotAllowed", "PivotRefused", "LibvirtUnreachable", "InSync", "GroupAborted",
            "InvalidPlan", "Conflict"} <= found


def test_every_reason_the_operator_writes_is_documented():
    assert sorted(reasons_in_the_code() - documented()) == []
