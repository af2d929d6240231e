"""`normsurgeon rotate` end to end through the CLI: exact, stock-loadable, one-line refusals, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as T

from faults import cli
from model_zoo import build_zoo

ROOT = Path(__file__).resolve().parents[1]


def test_rotate_the_example_is_exact_and_stock_loadable(capfd, tmp_path):
    out = tmp_path / "rot"
    code, stdout, err = cli(capfd, "rotate", ROOT / "examples" / "tiny-gpt2", "-o", out, "--method", "hadamard",
                            "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["schema"].startswith("normsurgeon.") and report["status"] == "pass"
    assert report["metrics"]["max_abs_logprob"]["value"] <= 1e-4  # float32
    src = T.AutoModelForCausalLM.from_pretrained(ROOT / "examples" / "tiny-gpt2").eval()
    rot = T.AutoModelForCausalLM.from_pretrained(out).eval()  # stock transformers, no normsurgeon
    ids = torch.arange(40)[None] % 256
    with torch.no_grad():
        gap = (src(ids).logits.log_softmax(-1) - rot(ids).logits.log_softmax(-1)).abs().max().item()
    assert gap <= 1e-4
    assert not torch.equal(src.transformer.wte.weight, rot.transformer.wte.weight)  # it did rotate


def test_rotate_refuses_a_post_ln_model_in_one_line(capfd, tmp_path):
    build_zoo("bert").save_pretrained(tmp_path / "src")
    code, _, err = cli(capfd, "rotate", tmp_path / "src", "-o", tmp_path / "out")
    assert code == 4
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]  # status lines start with "·"
    assert len(errors) == 1 and ("Post-LN" in errors[0] or "cannot convert" in errors[0])
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_rotate_bad_method_is_a_usage_error(capfd, tmp_path):
    code, _, err = cli(capfd, "rotate", ROOT / "examples" / "tiny-gpt2", "-o", tmp_path / "o", "--method", "givens")
    assert code == 2 and "givens" in err
