"""The shipped tiny GPT-2 converts exactly: float32 <= 1e-4 with 100% top-1, float64 <= 1e-10."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from normsurgeon.conversion import convert
from normsurgeon.verification.api import verify

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-gpt2"


def test_example_is_shipped_with_its_heldout_loss():
    assert (EXAMPLE / "model.safetensors").is_file()
    record = json.loads((EXAMPLE / "training.json").read_text())
    assert record["heldout_loss_nats_per_byte"]["after"] < 2.0


@pytest.mark.parametrize("target", ["rmsnorm", "crmsnorm"])
def test_example_converts_in_float32(target, tmp_path):
    report = convert(str(EXAMPLE), tmp_path / target, to=target)
    assert report["status"] == "pass"
    assert report["metrics"]["max_abs_logprob"]["value"] <= 1e-4
    assert report["metrics"]["top1_agreement_all"]["value"] == 1.0


def test_example_converts_in_float64(tmp_path):
    report = convert(str(EXAMPLE), tmp_path / "f64", to="rmsnorm", dtype="float64")
    assert report["metrics"]["max_abs_logprob"]["value"] <= 1e-10


def test_verify_on_real_text(tmp_path):
    out = tmp_path / "rms"
    convert(str(EXAMPLE), out, to="rmsnorm", run_verify=False)
    text = tmp_path / "sample.py"
    text.write_text(Path(json.__file__).read_text()[:4000])  # real Python source, bytes as tokens
    report = verify(str(EXAMPLE), str(out), text_file=text)
    assert report["status"] == "pass" and "text" in report["inputs"]["description"]
