"""The prepbn pipeline end to end on tiny models: output folder, loaders, report, resume, CLI errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from normsurgeon.prepbn.export import load_prepbn
from normsurgeon.prepbn.run import PRepBNOptions, run_prepbn

ROOT = Path(__file__).resolve().parents[2]
TINY = {"steps": 6, "batch_size": 8, "checkpoint_every": 3}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Random 3x16x16 images with 7 labels (the model zoo's ViT), as a .npz file."""
    gen = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "d.npz"
    np.savez(path, x=gen.normal(size=(40, 3, 16, 16)).astype("float32"), y=gen.integers(0, 7, 40))
    return str(path)


def _no_norms(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()} & {"LayerNorm", "PRepBN", "RepBN", "BatchNorm1d"}


def test_vit_finetune_fold_write_load(saved_family, images, tmp_path):
    from normsurgeon.io.loader import load_model

    out = tmp_path / "out"
    r = run_prepbn(str(saved_family("vit")), out, PRepBNOptions(data=images, finetune=True, overrides=TINY,
                                                                recalib_batches=2))
    assert r["status"] == "pass" and r["task"] == "image-classification" and r["metric"] == "accuracy"
    assert set(r["results"]) == {"before", "repbn_no_finetune", "after_finetune", "after_fold"}
    assert r["results"]["after_fold"]["accuracy"] == r["results"]["after_finetune"]["accuracy"]
    assert r["fold_check"]["float64"]["rel_to_scale"] <= 1e-10 and r["fold_check"]["float32"]["rel_to_scale"] <= 1e-4
    assert r["fold_check"]["written"]["max_abs_logit"] == 0.0 and r["train"]["steps_done"] == 6
    hist = [h["stage"] for h in r["train"]["history"]]
    assert hist[0] == "λ 1.000" and hist[-1] == "λ 0.000"  # warm-up 1 step, decay 4 steps, pure RepBN at step 5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "normsurgeon_vit" and cfg["normsurgeon"]["format"] == "prepbn"
    assert {"equivalence_report.md", "model.safetensors", "loss_curve.png"} <= {p.name for p in out.iterdir()}
    model = load_prepbn(out)
    assert not _no_norms(model)
    x = torch.from_numpy(np.load(images)["x"][:5])
    generic = load_model(str(out)).model  # the loader's generic custom-structure path reads it too
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, generic(pixel_values=x).logits)
    import transformers

    with pytest.raises(Exception):  # stock transformers refuses the renamed model_type
        transformers.AutoModelForImageClassification.from_pretrained(str(out), local_files_only=True)


def test_gpt2_text_loss_report(saved_family, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("DEF F(X):\n    RETURN X + 1\n" * 200)  # bytes < 96 (the zoo vocabulary)
    out = tmp_path / "out"
    r = run_prepbn(str(saved_family("gpt2")), out, PRepBNOptions(
        data=str(text), tokenizer="bytes", finetune=True, recalib_batches=2,
        overrides={"steps": 4, "batch_size": 2, "block_size": 16, "eval_windows": 2}))
    assert r["task"] == "causal-lm" and r["metric"] == "loss"
    assert r["fold"]["untied"] == ["lm_head"] and "lm_head" in r["fold"]["created_bias"]
    assert abs(r["results"]["after_fold"]["loss"] - r["results"]["after_finetune"]["loss"]) < 1e-4
    model = load_prepbn(out)
    assert not _no_norms(model) and model.lm_head.bias is not None


def test_resume_matches_uninterrupted(saved_family, images, tmp_path):
    src = str(saved_family("vit"))
    opts = dict(data=images, finetune=True, overrides=TINY, recalib_batches=1)
    run_prepbn(src, tmp_path / "a", PRepBNOptions(**opts))
    r = run_prepbn(src, tmp_path / "b", PRepBNOptions(**opts, stop_after=3))
    assert r["status"] == "interrupted" and not (tmp_path / "b").exists()
    r = run_prepbn(src, tmp_path / "b", PRepBNOptions(**opts, resume=True))
    assert r["train"]["resumed_from"] == 3
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(*args):
    from normsurgeon.cli import prepbn as cli_prepbn
    from normsurgeon.cli import app as main_app

    app = main_app if any(c.name == "prepbn" for c in main_app.registered_commands) else typer.Typer()
    if app is not main_app:
        app.command("noop", hidden=True)(lambda: None)  # keep a multi-command app, as the real CLI
        cli_prepbn.register(app)
    res = CliRunner().invoke(app, ["prepbn", *map(str, args)])
    return res.exit_code, res.output


def test_cli_one_line_errors(saved_family, tmp_path):
    code, output = _cli(saved_family("vit"), "-o", tmp_path / "o")
    assert code == 2 and "--data is required" in output and "Traceback" not in output
    code, output = _cli(saved_family("bert"), "--data", "x.txt", "-o", tmp_path / "o")
    assert code == 4 and "not a Pre-LN transformer" in output and not (tmp_path / "o").exists()


def test_shipped_tiny_vit(tmp_path):
    """The example: accuracy of the shipped ViT, and a short prepbn run on it (pipeline and fold only)."""
    import sys

    sys.path.insert(0, str(ROOT))
    from examples.tiny_vit.vit import CHECKPOINT, digits, pretrained
    from normsurgeon.prepbn.data import evaluate

    x, y = digits("heldout")
    assert evaluate(pretrained(), x, y)["accuracy"] > 0.95
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 400_000
    r = run_prepbn(str(CHECKPOINT), tmp_path / "o", PRepBNOptions(
        data="examples.tiny_vit.vit:digits", finetune=True, recalib_batches=4,
        overrides={"steps": 10, "batch_size": 32}))
    assert r["results"]["before"]["accuracy"] > 0.95 and r["fold_check"]["float32"]["ok"]
    assert r["results"]["after_fold"]["accuracy"] == r["results"]["after_finetune"]["accuracy"]
