"""core.verify: the pure rules of the check at the switch (the sample, what cannot be
checked, when QEMU must flush, what a result means for status, conditions and Events)."""

from __future__ import annotations

import pytest

from blockcopy.core import verify
from blockcopy.core.reconcile import Action, Decision
from blockcopy.model.api import BlockCopySpec, NetworkDest, Phase, SpecError, Verify, parse_spec
from blockcopy.model.observation import DiskState

GIB = 1 << 30
SPEC = {"domain": "vm", "disk": "vda", "dest": "/images/copy.qcow2"}


def spec(**fields: object) -> BlockCopySpec:
    return parse_spec({**SPEC, **fields})


def disk(**fields: object) -> DiskState:
    base: dict[str, object] = {"domain_found": True, "disk_found": True, "target": "vda",
                               "source": "/images/vm.qcow2", "source_format": "qcow2"}
    return DiskState(**{**base, **fields})  # type: ignore[arg-type]


# -- the spec -------------------------------------------------------------------------

def test_spec_verify_values():
    assert spec().verify is None  # absent: Sample, lenient
    assert spec(verify="Sample").verify == Verify.SAMPLE
    assert spec(verify="Full").verify == Verify.FULL
    assert spec(verify="None").verify == Verify.NONE
    with pytest.raises(SpecError, match=r"spec\.verify 'sample'.*'None', 'Sample', 'Full'"):
        spec(verify="sample")


# -- the sample -----------------------------------------------------------------------

def test_the_sample_is_aligned_distinct_sorted_and_seeded():
    data = [(0, 64 << 20), (GIB, 16 << 20)]
    a = verify.sample(b"seed-1", 8 * GIB, data)
    assert len(a) == verify.SAMPLES == len(set(a))
    assert a == sorted(a) and all(off % verify.BLOCK == 0 and off < 8 * GIB for off in a)
    assert verify.sample(b"seed-1", 8 * GIB, data) == a  # the same seed, the same blocks
    assert verify.sample(b"seed-2", 8 * GIB, data) != a


def test_seven_eighths_where_the_source_holds_data():
    data = [(0, 64 << 20), (GIB, 16 << 20)]
    offsets = verify.sample(b"s", 8 * GIB, data)
    in_data = [o for o in offsets if any(s <= o < s + n for s, n in data)]
    # 896 drawn in the data; of the 128 drawn anywhere about 1% land in it too.
    assert 896 <= len(in_data) <= 896 + 20
    assert any(GIB <= o < GIB + (16 << 20) for o in offsets)  # both extents are drawn from
    assert any(o >= 2 * GIB for o in offsets)  # and the rest of the disk


def test_little_data_is_sampled_whole_and_unaligned_extents_cover_their_blocks():
    # 3 blocks of data, one straddling a block boundary: every block it touches is taken.
    data = [(10 * 4096 + 100, 4096), (100 * 4096, 4096)]
    offsets = verify.sample(b"s", GIB, data)
    assert {10 * 4096, 11 * 4096, 100 * 4096} <= set(offsets)
    assert len(offsets) == verify.SAMPLES


def test_a_small_disk_is_compared_whole_with_a_short_last_block():
    size = 10 * 4096 + 512
    offsets = verify.sample(b"s", size, [(0, size)])
    assert offsets == [i * 4096 for i in range(11)]
    assert verify.block_length(offsets[-1], size) == 512
    assert verify.block_length(0, size) == 4096


def test_an_empty_disk_is_sampled_anywhere():
    offsets = verify.sample(b"s", 4 * GIB, [])
    assert len(offsets) == verify.SAMPLES and offsets[-1] < 4 * GIB


def test_compare_counts_and_finds_the_first():
    assert verify.compare([0, 4096, 8192], [b"a", b"b", b"c"], [b"a", b"x", b"y"]) == (2, 4096)
    assert verify.compare([0], [b"a"], [b"a"]) == (0, None)
    assert verify.offset_in("Content mismatch at offset 8388608!") == 8388608
    assert verify.offset_in("Images are different") is None


# -- what cannot be checked ---------------------------------------------------------

@pytest.mark.parametrize(("fields", "dest_format", "network", "why"), [
    ({}, "qcow2", True, "NBD export"),
    ({"source": "rbd://pool/image"}, "raw", False, "not a local file"),
    ({"source": None}, "raw", False, "not a local file"),
    ({"encryption": "<encryption format='luks'/>"}, "qcow2", False, "encrypted"),
    ({"chain_encrypted": True}, "qcow2", False, "encrypted"),
    ({"source_format": "vmdk"}, "qcow2", False, "source's format vmdk"),
    ({}, "vdi", False, "destination's format vdi"),
    ({"chain": ("/b.img",), "chain_formats": ("luks",)}, "qcow2", False, "backing image"),
])
def test_what_cannot_be_checked(fields, dest_format, network, why):
    found = verify.not_verifiable(disk(**fields), dest="/images/copy", dest_format=dest_format,
                                  network=network)
    assert found is not None and why in found


def test_raw_and_qcow2_chains_can_be_checked():
    assert verify.not_verifiable(disk(chain=("/b.raw",), chain_formats=("raw",)),
                                 dest="/dev/sdb", dest_format="raw", network=False) is None


@pytest.mark.parametrize(("source", "dest", "flush"), [
    ("raw", "raw", False), ("raw", "qcow2", True), ("qcow2", "raw", True),
    ("qcow2", "qcow2", True)])
def test_a_flush_where_qcow2_metadata_is_read(source, dest, flush):
    assert verify.needs_flush(source_format=source, dest_format=dest) is flush


def test_full_is_bounded_by_the_size():
    assert verify.full_limit(GIB) == 60.0
    assert verify.full_limit(20 * GIB) == 200.0


# -- results ------------------------------------------------------------------------

PIVOT = Decision(Phase.PIVOTING, Action.PIVOT, reason="Pivoting")


def test_a_match_pivots_with_a_normal_event():
    result = verify.matched(Verify.SAMPLE, 1024, 42)
    assert not result.held and verify.decision(result, PIVOT) is PIVOT
    assert verify.condition(result)["status"] == "True"
    assert verify.event(result) == ("Normal", "Verified", result.message)
    field = verify.status_field(result, "2026-01-01T00:00:00Z")
    assert field == {"method": "Sample", "result": "Match", "samples": 1024, "blockSize": 4096,
                     "mismatches": 0, "pauseMs": 42, "time": "2026-01-01T00:00:00Z",
                     "message": result.message}


def test_a_mismatch_fails_on_the_source():
    result = verify.mismatched(Verify.SAMPLE, 1024, 3, 8 << 20, 50)
    assert result.held
    decided = verify.decision(result, PIVOT)
    assert (decided.phase, decided.reason, decided.action) == (Phase.FAILED, "VerifyMismatch",
                                                                Action.NONE)
    assert "3 of 1024" in decided.message and str(8 << 20) in decided.message
    assert verify.condition(result)["reason"] == "VerifyMismatch"
    assert verify.event(result) is None  # the Failed phase's Warning tells it
    assert verify.status_field(result, "t")["firstMismatch"] == 8 << 20


def test_cannot_check_pivots_unless_asked_for():
    lenient = verify.not_verified(spec(), "the disk is encrypted")
    assert not lenient.held and lenient.reason == "NotVerified"
    assert verify.decision(lenient, PIVOT) is PIVOT
    assert verify.event(lenient) == ("Normal", "NotVerified", lenient.message)
    strict = verify.not_verified(spec(verify="Sample"), "the disk is encrypted")
    assert strict.held and strict.reason == "NotVerifiable"
    decided = verify.decision(strict, PIVOT)
    assert (decided.phase, decided.reason, decided.warning) == (Phase.MIRRORED,
                                                                "NotVerifiable", True)
    assert "spec.verify Sample cannot be done: the disk is encrypted" in decided.message


def test_not_asked():
    result = verify.not_asked()
    assert not result.held and verify.event(result) is None
    assert verify.condition(result) == {"type": "Verified", "status": "False",
                                        "reason": "NotAsked", "message": result.message}
    assert verify.status_field(result, "t")["result"] == "NotVerified"


def test_the_condition_is_kept_between_checks():
    previous = [{"type": "Ready", "status": "True"},
                {"type": "Verified", "status": "False", "reason": "NotVerifiable",
                 "message": "m", "lastTransitionTime": "t"}]
    assert verify.kept(previous) == [{"type": "Verified", "status": "False",
                                      "reason": "NotVerifiable", "message": "m"}]
    assert verify.kept(None) == []


def test_network_dest_is_parsed_for_the_check():
    parsed = spec(dest="nbd://127.0.0.1:10809/x", verify="Sample")
    assert isinstance(parsed.network, NetworkDest)
    assert verify.not_verifiable(disk(), dest=parsed.dest, dest_format="raw", network=True)
