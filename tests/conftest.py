"""Shared test setup: the hack/ helpers are importable as modules (testvm)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
