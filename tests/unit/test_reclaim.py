"""Source retention (agent.reclaim, spec.deleteSourcesUnder): after the pivot, the old
chain's images under the directory that no domain uses are deleted, nothing else; on the
fake hypervisor and qemu-img, with real files in a temporary directory."""

from __future__ import annotations

import pytest

from blockcopy.adapters.files import LocalFiles
from blockcopy.agent.inuse import ImageUsers
from blockcopy.agent.reclaim import reclaim, summary
from blockcopy.model.api import SpecError, parse_spec
from support.fakes import FakeHypervisor, FakeImages


def files_in(tmp_path, *names):
    paths = []
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        paths.append(str(path))
    return paths


@pytest.mark.asyncio
async def test_unused_images_under_the_directory_deleted_shared_ones_kept(tmp_path):
    top, mid, base, other_top = files_in(tmp_path, "pool/vm/top.qcow2", "pool/vm/mid.qcow2",
                                         "pool/base.qcow2", "pool/other/top.qcow2")
    (outside,) = files_in(tmp_path, "elsewhere/base0.qcow2")
    hv, images, files = FakeHypervisor(), FakeImages(), LocalFiles()
    images.chains[top] = [mid, base, outside]
    # Another running VM shares the base (a backing image of its chain).
    hv.add_domain("other", disks={"vda": other_top})
    hv.disk("other").chain = (base,)
    # The moved VM runs on its copy now.
    hv.add_domain("moved", disks={"vda": str(tmp_path / "new" / "top.qcow2")})
    spec = parse_spec({"domain": "moved", "disk": "vda", "dest": str(tmp_path / "new/top"),
                       "deleteSourcesUnder": str(tmp_path / "pool")})
    in_use = ImageUsers(hv=hv, images=images, files=files)
    done = await reclaim(spec, {"source": top}, images=images, files=files, in_use=in_use)
    assert done is not None
    assert done["deleted"] == [top, mid]
    assert [k.split(":")[0] for k in done["kept"]] == [outside, base]
    assert "used by domain other" in done["kept"][1]
    assert not (tmp_path / "pool/vm/top.qcow2").exists()
    assert (tmp_path / "pool/base.qcow2").exists() and (tmp_path / "elsewhere").exists()
    assert summary(done).startswith("deleted 2 source image(s), kept 2")
    # Done once: recorded in status, not again.
    again = await reclaim(spec, {"source": top, "reclaimedSources": done}, images=images,
                          files=files, in_use=in_use)
    assert again is None


@pytest.mark.asyncio
async def test_nothing_without_the_field_or_with_the_image_still_in_use(tmp_path):
    (top,) = files_in(tmp_path, "pool/vm/top.qcow2")
    hv, images, files = FakeHypervisor(), FakeImages(), LocalFiles()
    in_use = ImageUsers(hv=hv, images=images, files=files)
    plain = parse_spec({"domain": "vm", "disk": "vda", "dest": "/x/y"})
    assert await reclaim(plain, {"source": top}, images=images, files=files,
                         in_use=in_use) is None
    # Still the disk of a (stopped) domain's definition: kept.
    hv.add_domain("vm", disks={"vda": top}, running=False)
    spec = parse_spec({"domain": "vm", "disk": "vda", "dest": "/x/y",
                       "deleteSourcesUnder": str(tmp_path)})
    done = await reclaim(spec, {"source": top}, images=images, files=files, in_use=in_use)
    assert done == {"deleted": [], "kept": [f"{top}: used by domain vm (vda)"]}


def test_the_field_must_be_an_absolute_directory():
    base = {"domain": "vm", "disk": "vda", "dest": "/x/y"}
    for bad in ("pool", "/"):
        with pytest.raises(SpecError, match="deleteSourcesUnder"):
            parse_spec({**base, "deleteSourcesUnder": bad})
    assert parse_spec({**base, "deleteSourcesUnder": "/a/b/"}).delete_sources_under == "/a/b"
