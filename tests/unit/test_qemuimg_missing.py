"""A node (or an agent image) without qemu-img: every qemu-img verb raises ImageError with
what to install, which the callers turn into a refusal or an unverified check (the chart's
image once lacked it, and the follower died in the check at the switch on a
FileNotFoundError)."""

from __future__ import annotations

import pytest

from blockcopy.adapters.qemuimg import QemuImg
from blockcopy.model.ports import ImageError

pytestmark = pytest.mark.asyncio


@pytest.fixture
def no_qemu_img(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: nothing to execute


@pytest.mark.parametrize("verb", ["info", "identical", "compare_in_use"])
async def test_a_missing_qemu_img_is_an_image_error(no_qemu_img, verb, tmp_path):
    images = QemuImg()
    path = str(tmp_path / "a.qcow2")
    calls = {
        "info": lambda: images.info(path),
        "identical": lambda: images.identical(path, path, format="qcow2"),
        "compare_in_use": lambda: images.compare_in_use(path, path, format_a="qcow2",
                                                        format_b="qcow2", timeout=5),
    }
    with pytest.raises(ImageError, match=r"qemu-img is not installed .*qemu-utils"):
        await calls[verb]()
