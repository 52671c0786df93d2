"""The node inventory's model (blockcopy.model.inventory): the status round trip, the bounds
(and that the CRD's schema says the same), tolerant parsing."""

from __future__ import annotations

import json
import pathlib

import yaml

from blockcopy.model.inventory import (
    MAX_CHAIN,
    MAX_DISKS,
    MAX_DOMAINS,
    MAX_STATUS_BYTES,
    BackingImage,
    DiskType,
    DomainState,
    InventoryDisk,
    InventoryDomain,
    bounded,
    parse_inventory,
)

CRD = yaml.safe_load((pathlib.Path(__file__).parents[2] / "crds" / "diskinventory.yaml")
                     .read_text())
STATUS = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def disk(target: str = "vda", **kw: object) -> InventoryDisk:
    values: dict[str, object] = {
        "type": DiskType.FILE, "source": f"/images/{target}.qcow2", "format": "qcow2",
        "virtual_size": 1 << 30, "allocation": 1 << 20,
        "backing_chain": (BackingImage("/images/base.raw", "raw"),)}
    values.update(kw)
    return InventoryDisk(target, **values)  # type: ignore[arg-type]


def domain(name: str, disks: tuple[InventoryDisk, ...] = (), state: DomainState =
           DomainState.RUNNING) -> InventoryDomain:
    return InventoryDomain(name, f"uuid-{name}", state, disks or (disk(),))


def test_status_round_trip_keeps_every_field():
    inv = bounded("hv-1", "2026-12-04T05:00:00Z", [
        domain("b", (disk("vda"), disk("vdb", allocation=None, backing_chain=()))),
        domain("a", (disk("sda", type=DiskType.NETWORK, source="nbd://h:10809/e",
                          format="raw", virtual_size=None, allocation=None,
                          backing_chain=()),), DomainState.STOPPED)])
    status = inv.to_status()
    assert [d["name"] for d in status["domains"]] == ["a", "b"]  # sorted by name
    assert status["domainCount"] == 2 and status["truncated"] is False
    assert status["domains"][1]["disks"][1] == {
        "target": "vdb", "type": "file", "source": "/images/vdb.qcow2", "format": "qcow2",
        "virtualSize": 1 << 30, "backingChain": []}
    assert "virtualSize" not in status["domains"][0]["disks"][0]
    assert parse_inventory(json.loads(json.dumps(status))) == inv
    assert "updated" not in inv.content() and inv.content()["domainCount"] == 2


def test_find_by_name_or_uuid():
    inv = bounded("hv-1", "t", [domain("vm1"), domain("vm2")])
    assert inv.find("vm2") is not None and inv.find("vm2").name == "vm2"  # type: ignore[union-attr]
    assert inv.find("UUID-VM1") is not None
    assert inv.find("vm3") is None


def test_bounds_cut_domains_disks_and_chains():
    many = [domain(f"vm{i:05d}") for i in range(MAX_DOMAINS + 5)]
    inv = bounded("hv", "t", many)
    assert len(inv.domains) == MAX_DOMAINS and inv.domain_count == MAX_DOMAINS + 5
    assert inv.truncated
    wide = domain("wide", tuple(disk(f"vd{i}") for i in range(MAX_DISKS + 1)))
    deep = domain("deep", (disk(backing_chain=tuple(BackingImage(f"/b{i}")
                                                    for i in range(MAX_CHAIN + 3))),))
    inv = bounded("hv", "t", [wide, deep])
    assert inv.truncated and len(inv.domains) == 2
    assert len(inv.domains[1].disks) == MAX_DISKS
    assert len(inv.domains[0].disks[0].backing_chain) == MAX_CHAIN
    assert not bounded("hv", "t", [domain("x")]).truncated


def test_the_status_is_cut_at_one_mebibyte():
    long = "/" + "p" * 4000
    big = [domain(f"vm{i:04d}", tuple(disk(f"vd{j}", source=long) for j in range(8)))
           for i in range(100)]
    inv = bounded("hv", "2026-12-04T05:00:00Z", big)
    encoded = len(json.dumps(inv.to_status(), separators=(",", ":")).encode())
    assert inv.truncated and 0 < len(inv.domains) < 100 and inv.domain_count == 100
    assert encoded <= MAX_STATUS_BYTES
    assert encoded > MAX_STATUS_BYTES - 40_000  # cut close to the bound, not far below it


def test_parse_is_tolerant():
    inv = parse_inventory({"nodeName": "hv", "domains": [
        {"name": "ok", "uuid": "u", "state": "Weird", "disks": [
            {"target": "vda", "type": "odd", "virtualSize": "12", "backingChain": [{}]},
            {"no": "target"}]},
        {"uuid": "nameless"}, "junk"]})
    assert inv.domain_count == 1 and inv.updated == ""
    (d,) = inv.domains
    assert d.state is DomainState.OTHER
    assert d.disks == (InventoryDisk("vda", DiskType.FILE),)
    assert parse_inventory({}).domains == ()


def test_the_crd_schema_has_the_same_bounds_and_enums():
    domains = STATUS["properties"]["domains"]
    disks = domains["items"]["properties"]["disks"]
    chain = disks["items"]["properties"]["backingChain"]
    assert domains["maxItems"] == MAX_DOMAINS
    assert disks["maxItems"] == MAX_DISKS
    assert chain["maxItems"] == MAX_CHAIN
    assert domains["items"]["properties"]["state"]["enum"] == [str(s) for s in DomainState]
    assert disks["items"]["properties"]["type"]["enum"] == [str(t) for t in DiskType]
    assert CRD["spec"]["scope"] == "Cluster"
    assert CRD["metadata"]["name"] == "diskinventories.blockcopy.dev"
    columns = {c["name"]: c["jsonPath"] for c in
               CRD["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns == {"Node": ".status.nodeName", "Domains": ".status.domainCount",
                       "Updated": ".status.updated"}
