"""What the plugin prints and parses: rates, durations, phases and kubectl-like tables."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from blockcopy.kubectl.names import GROUP_LABEL, PHASES, TERMINAL


def human_rate(rate: Any) -> str:
    """Bytes per second in binary units: ``12.5 MiB/s``; empty when unknown."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or rate < 0:
        return ""
    value, unit = float(rate), "B/s"
    for unit in ("B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"):
        if value < 1024 or unit == "TiB/s":
            break
        value /= 1024
    return f"{int(value)} {unit}" if unit == "B/s" else f"{value:.1f} {unit}"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h30m``, ``1.5h`` as seconds (argparse type)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 5m or 1h30m")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def group_of(obj: Mapping[str, Any]) -> str:
    return ((obj.get("spec") or {}).get("group")
            or ((obj.get("metadata") or {}).get("labels") or {}).get(GROUP_LABEL) or "")


def phase_of(obj: Mapping[str, Any]) -> str:
    return (obj.get("status") or {}).get("phase") or ""


def condition_true(obj: Mapping[str, Any], ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """kubectl's plain table: upper-case headers, columns three spaces apart."""
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [list(headers), *rows]]
    return "\n".join(lines)


def rows(objects: Sequence[Mapping[str, Any]], *, namespaces: bool, message: bool
         ) -> tuple[list[str], list[list[Any]]]:
    headers = ["NAME", "DOMAIN", "DISK", "PHASE", "PROGRESS", "RATE", "ETA", "NODE", "GROUP"]
    if namespaces:
        headers.insert(0, "NAMESPACE")
    if message:
        headers.append("MESSAGE")
    out = []
    for obj in objects:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        phase = status.get("phase") or ""
        row = [meta["name"], spec.get("domain"), spec.get("disk"), phase,
               status.get("progress"), human_rate(status.get("rate")) if phase == "Copying"
               else "", status.get("eta"), status.get("nodeName") or spec.get("nodeName"),
               group_of(obj)]
        if namespaces:
            row.insert(0, meta.get("namespace"))
        if message:
            row.append(" ".join(str(status.get("message") or "").split()))
        out.append(row)
    return headers, out


def canonical_phase(text: str) -> str:
    """A phase name in any case, as the API spells it (argparse type)."""
    for phase in PHASES:
        if phase.lower() == text.strip().lower():
            return phase
    raise argparse.ArgumentTypeError(f"unknown phase {text!r}; phases: {', '.join(PHASES)}")


def reached(obj: Mapping[str, Any], want: str) -> bool:
    """Whether ``obj`` is in phase ``want``; Mirrored also counts once passed (the Mirrored
    condition stays True after a pivot or an abort of a ready mirror)."""
    return phase_of(obj) == want or (want == "Mirrored" and condition_true(obj, "Mirrored"))


def cannot_reach(obj: Mapping[str, Any], want: str) -> str | None:
    """Why ``obj`` can never reach ``want`` (it ended in another terminal phase), or None."""
    phase = phase_of(obj)
    if phase in TERMINAL and phase != want and not reached(obj, want):
        message = " ".join(str((obj.get("status") or {}).get("message") or "").split())
        name = obj["metadata"]["name"]
        return f"{name} is {phase}" + (f": {message}" if message else "")
    return None
