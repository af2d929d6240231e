"""Vision models verify on built-in pixels and on a folder of images."""
from __future__ import annotations

import numpy as np
from PIL import Image

from normsurgeon.conversion import convert
from normsurgeon.verification.api import verify


def test_vit_verify_on_image_folder(saved_family, tmp_path):
    out = tmp_path / "vit-rms"
    report = convert(str(saved_family("vit")), out, to="rmsnorm")
    assert report["status"] == "pass" and "stock_load" in report
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(images / f"{i}.png")
    report = verify(str(saved_family("vit")), str(out), image_dir=images)
    assert report["status"] == "pass"
    assert report["inputs"]["description"].startswith(f"images {images}")
