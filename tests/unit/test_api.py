"""Spec parsing: good input parses, bad input gives a clear SpecError and nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockcopy.model.api import Flag, SpecError, parse_bandwidth, parse_spec
from support.invalid_specs import INVALID

GOOD = {"domain": "vm1", "disk": "vda", "dest": "/var/lib/libvirt/images/copy.qcow2"}


def test_minimal_spec_defaults():
    spec = parse_spec(GOOD)
    assert (spec.domain, spec.disk, spec.dest) == ("vm1", "vda", GOOD["dest"])
    assert spec.pivot is False and spec.abort is False and spec.flags == frozenset()
    assert spec.format is None and spec.bandwidth == 0 and spec.node_name is None


def test_full_spec():
    spec = parse_spec({**GOOD, "nodeName": "n1", "format": "raw", "flags": ["shallow",
                       "transientJob"], "bandwidth": "100Mi", "granularity": 65536,
                       "bufSize": 1048576, "pivot": True, "abort": False})
    assert spec.flags == {Flag.SHALLOW, Flag.TRANSIENT_JOB}
    assert spec.bandwidth == 100 * 2**20 and spec.granularity == 65536
    assert spec.node_name == "n1" and spec.format == "raw" and spec.pivot


@pytest.mark.parametrize("value,expected", [
    ("100Mi", 100 * 2**20), ("1Gi", 2**30), ("5M", 5_000_000), ("1k", 1000), (2048, 2048),
    ("0", 0), (0, 0), (None, 0), ("1.5Ki", 1536), ("  7Ki ", 7168),
])
def test_bandwidth_quantities(value, expected):
    assert parse_bandwidth(value) == expected


# Every invalid spec the agent knows is in tests/support/invalid_specs.py, with the API
# server's refusal of it: tests/unit/test_invalid_specs.py runs each through parse_spec.
@pytest.mark.parametrize("value", [r.spec["bandwidth"] for r in INVALID
                                   if r.id.startswith("bandwidth-") and r.agent])
def test_bad_bandwidth(value):
    with pytest.raises(SpecError, match="bandwidth"):
        parse_bandwidth(value)


def test_not_a_mapping():
    with pytest.raises(SpecError, match="spec must be an object"):
        parse_spec(["domain"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=10)
FIELDS = ["domain", "disk", "dest", "nodeName", "format", "base", "flags", "bandwidth",
          "granularity", "bufSize", "pivot", "abort"]


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=12))
def test_any_input_parses_or_gives_a_spec_error(raw):
    """Never an exception other than SpecError, and its message is a readable sentence."""
    try:
        parse_spec(raw)
    except SpecError as exc:
        assert str(exc) and len(str(exc)) < 300


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.text(max_size=12)))
def test_any_bandwidth_parses_or_gives_a_spec_error(value):
    try:
        assert parse_bandwidth(value) >= 0
    except SpecError as exc:
        assert "bandwidth" in str(exc)


def test_running_spec_keeps_started_fields_and_refuses_invalid_edits():
    from blockcopy.model.startedspec import (
        parse_running_spec,
        pin_started_fields,
        started_fields,
    )

    started = started_fields({**GOOD, "flags": ["shallow"], "pivot": True})
    assert started == {**GOOD, "flags": ["shallow"]}  # mutable fields are not pinned
    edited = {**GOOD, "dest": "/var/lib/libvirt/images/other.qcow2", "flags": [],
              "bandwidth": "fast", "pivot": True}
    raw, changed = pin_started_fields(edited, started)
    assert changed == ["dest", "flags"] and raw["dest"] == GOOD["dest"]
    spec, problems = parse_running_spec(edited, started, bandwidth_in_effect=1024)
    assert spec.dest == GOOD["dest"] and spec.flags == {Flag.SHALLOW}
    assert spec.bandwidth == 1024 and spec.pivot is True
    assert problems and "bandwidth" in problems[0]
    same, none = parse_running_spec({**GOOD, "flags": ["shallow"], "bandwidth": "2Mi"}, started, 0)
    assert none == [] and same.bandwidth == 2 * 2**20
