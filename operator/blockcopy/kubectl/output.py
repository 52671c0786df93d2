"""``-o table|wide|name|json|yaml``: how list and status print BlockCopies, once or as a
watch prints them (one line or document per change)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from blockcopy.kubectl.names import RESOURCE
from blockcopy.kubectl.text import human_rate, rows, table

FORMATS = ("table", "wide", "name", "json", "yaml")
WIDE = ["SOURCE", "DEST", "LIMIT", "PIVOT", "AGENT", "AGE"]


def age(created: str | None, now: dt.datetime) -> str:
    """kubectl's AGE (k8s.io/apimachinery's HumanDuration): 90s, 5m30s, 42m, 3h5m, 20h,
    3d4h, 45d, 2y70d; empty when unknown."""
    try:
        then = dt.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return ""
    s = max(0, int((now - then).total_seconds()))
    m, h, d = s // 60, s // 3600, s // 86400

    def two(big: int, unit: str, small: int, small_unit: str) -> str:
        return f"{big}{unit}{small}{small_unit}" if small else f"{big}{unit}"
    if s < 120:
        return f"{s}s"
    if m < 10:
        return two(m, "m", s % 60, "s")
    if m < 180:
        return f"{m}m"
    if h < 8:
        return two(h, "h", m % 60, "m")
    if h < 48:
        return f"{h}h"
    if h < 192:
        return two(d, "d", h % 24, "h")
    if d < 730:
        return f"{d}d"
    return two(d // 365, "y", d % 365, "d") if d < 8 * 365 else f"{d // 365}y"


def wide_cells(obj: Mapping[str, Any], now: dt.datetime) -> list[Any]:
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    limit = status.get("bandwidth")
    return [status.get("source"), spec.get("dest"),
            human_rate(limit) if limit else ("unlimited" if limit == 0 else ""),
            "yes" if spec.get("pivot") else "no", status.get("agentVersion"),
            age(meta.get("creationTimestamp"), now)]


def table_rows(objects: Sequence[Mapping[str, Any]], *, namespaces: bool, message: bool,
               wide: bool, now: dt.datetime | None = None
               ) -> tuple[list[str], list[list[Any]]]:
    """The columns of ``-o table`` (``wide``: and the source, destination, limit, pivot,
    agent version and age, before the message)."""
    headers, cells = rows(objects, namespaces=namespaces, message=message)
    if not wide:
        return headers, cells
    now = now or dt.datetime.now(dt.UTC)
    at = len(headers) - (1 if message else 0)
    headers[at:at] = WIDE
    for row, obj in zip(cells, objects, strict=True):
        row[at:at] = wide_cells(obj, now)
    return headers, cells


def name_of(obj: Mapping[str, Any]) -> str:
    """``-o name``: what kubectl takes back (``kubectl delete blockcopies.blockcopy.dev/x``)."""
    return f"{RESOURCE}/{obj['metadata']['name']}"


def as_list(objects: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": list(objects)}


def render(fmt: str, objects: Sequence[Mapping[str, Any]], *, namespaces: bool,
           message: bool) -> str:
    """Every object at once (an empty table is the caller's to explain: returns '')."""
    if fmt == "json":
        return json.dumps(as_list(objects), indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(as_list(objects), sort_keys=False).rstrip()
    if fmt == "name":
        return "\n".join(name_of(o) for o in objects)
    if not objects:
        return ""
    return table(*table_rows(objects, namespaces=namespaces, message=message,
                             wide=fmt == "wide"))


class Changes:
    """What a watch prints: for a table, the header and rows of the objects first, then one
    row per change, aligned with the first rows where they fit; for name, json and yaml one
    line or document per change. A change that would print what was last printed for the
    object (kopf's bookkeeping, a status write of the same phase and progress) prints
    nothing."""

    def __init__(self, fmt: str, *, namespaces: bool, message: bool):
        self.fmt, self.namespaces, self.message = fmt, namespaces, message
        self.widths: list[int] = []
        self.last: dict[tuple[str, str], str] = {}

    def _key(self, obj: Mapping[str, Any]) -> tuple[str, str]:
        meta = obj["metadata"]
        return meta.get("namespace", ""), meta["name"]

    def _one(self, obj: Mapping[str, Any], kind: str) -> str:
        if self.fmt == "name":
            return name_of(obj)
        if self.fmt == "json":
            return json.dumps(obj)
        if self.fmt == "yaml":
            return "---\n" + yaml.safe_dump(dict(obj), sort_keys=False).rstrip()
        headers, (row,) = table_rows([obj], namespaces=self.namespaces, message=self.message,
                                     wide=self.fmt == "wide")
        if kind == "DELETED":
            row[headers.index("PHASE")] = "(deleted)"
        cells = ["" if v is None else str(v) for v in row]
        widths = self.widths or [0] * len(cells)
        return "   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    def first(self, objects: Sequence[Mapping[str, Any]]) -> str:
        """The objects as they are when the watch starts."""
        if self.fmt in ("table", "wide"):
            if not objects:
                return ""
            text = render(self.fmt, objects, namespaces=self.namespaces, message=self.message)
            lines = text.splitlines()
            header = lines[0]
            starts = [i for i, ch in enumerate(header) if ch != " " and
                      (i == 0 or header[i - 1] == " ")]
            self.widths = [b - a - 3 for a, b in itertools.pairwise(starts)] + [0]
            for obj, line in zip(objects, lines[1:], strict=True):
                self.last[self._key(obj)] = line.rstrip()
            return text
        printed = []
        for obj in objects:
            line = self._one(obj, "ADDED")
            self.last[self._key(obj)] = line
            printed.append(line)
        return "\n".join(printed)

    def change(self, kind: str, obj: Mapping[str, Any]) -> str | None:
        """The line (or document) for one watch event, or None: nothing to show."""
        line = self._one(obj, kind)
        key = self._key(obj)
        if kind != "DELETED" and self._comparable(line) == self._comparable(self.last.get(key)):
            return None
        self.last[key] = line
        if not self.widths and self.fmt in ("table", "wide"):
            # Nothing existed when the watch started: the header comes with the first row.
            headers, _ = table_rows([obj], namespaces=self.namespaces, message=self.message,
                                    wide=self.fmt == "wide")
            header = table(headers, [])
            self.widths = [len(h) for h in headers[:-1]] + [0]
            line = self._one(obj, kind)
            self.last[key] = line
            return f"{header}\n{line}"
        return line

    def _comparable(self, line: str | None) -> str | None:
        """JSON and YAML documents differ with every write (resourceVersion, kopf's stanza):
        compared without metadata.resourceVersion, managedFields and status.kopf."""
        if line is None or self.fmt not in ("json", "yaml"):
            return " ".join(line.split()) if line is not None else None
        obj = json.loads(line) if self.fmt == "json" else yaml.safe_load(line[4:])
        meta = {k: v for k, v in (obj.get("metadata") or {}).items()
                if k not in ("resourceVersion", "managedFields", "generation")}
        status = {k: v for k, v in (obj.get("status") or {}).items() if k != "kopf"}
        return json.dumps({**obj, "metadata": meta, "status": status}, sort_keys=True)
