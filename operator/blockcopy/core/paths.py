"""Paths compared as strings (the caller resolves symlinks first): is one under a root."""

from __future__ import annotations


def within(path: str, root: str) -> bool:
    """``path`` is ``root`` or lies below it (both already resolved and normalised)."""
    return path == root or path.startswith(root.rstrip("/") + "/")
