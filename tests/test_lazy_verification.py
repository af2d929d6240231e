"""Verification runs the written model unit by unit from its shards (``verification/lazy.py``): it must
measure what a whole load measures, catch a bad checkpoint, and keep the float64 reference exact.

Tolerances: the lazy and whole loads compute the same float32 (or float64) model on the same inputs, so
their metrics agree to within 1e-6 absolute (float32) - in practice bit-for-bit.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_zoo import build_zoo
from normsurgeon.conversion import convert
from normsurgeon.io.loader import load_model
from normsurgeon.recipes import recipe_for_target
from normsurgeon.verification import lazy, roundoff, written
from normsurgeon.verification.lazy import LazyUnsupported

FAMILIES = ["gpt2", "bloom", "falcon", "llama", "mixtral", "gemma", "t5", "whisper", "vit", "esm", "dbrx"]
METRICS = ("max_abs_logprob", "mean_kl", "max_abs_logit")


def _converted(family: str, tmp_path, dtype=None):
    src_dir, out = tmp_path / "src", tmp_path / "out"
    build_zoo(family).save_pretrained(src_dir)
    try:
        convert(str(src_dir), out, run_verify=False, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - a refusal is tests/test_support_matrix.py's subject
        pytest.skip(f"not convertible here: {e}")
    return load_model(str(src_dir)), out


@contextlib.contextmanager
def _whole_load(monkeypatch):
    def refuse(folder, stock):
        raise LazyUnsupported("forced whole load for the comparison")

    with monkeypatch.context() as m:
        m.setattr(lazy, "lazy_output", refuse)
        yield


@pytest.mark.parametrize("family", FAMILIES)
def test_unit_by_unit_measures_what_a_whole_load_measures(family, tmp_path, monkeypatch):
    src, out = _converted(family, tmp_path)
    plan_stock = load_model(str(out)).converted.get("stock_loadable", False)
    settings = recipe_for_target("rmsnorm").verify
    lazy = written.verify_written(src, out, plan_stock, settings)
    with _whole_load(monkeypatch):
        whole = written.verify_written(load_model(str(src.path)), out, plan_stock, settings)
    assert whole["output"]["loaded"].startswith("whole")
    assert lazy["status"] == whole["status"] == "pass", (lazy["metrics"], whole["metrics"])
    for k in METRICS:
        assert lazy["metrics"][k]["value"] == pytest.approx(whole["metrics"][k]["value"], abs=1e-6), k
    if plan_stock:
        assert lazy["stock_load"]["status"] == "pass"
    if family in ("gpt2", "llama", "t5"):  # the path under test is the one taken
        assert lazy["output"]["loaded"] == "unit by unit"


def test_unit_by_unit_catches_a_corrupted_checkpoint(tmp_path):
    src, out = _converted("gpt2", tmp_path)
    shard = out / "model.safetensors"
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("h.1.mlp.c_fc.weight"))
    tensors[name] = tensors[name] * 1.01  # a 1 % error in one block's reader: a bad fold
    save_file(tensors, shard, metadata={"format": "pt"})
    r = written.verify_written(src, out, True, recipe_for_target("rmsnorm").verify)
    assert r["output"]["loaded"] == "unit by unit"
    assert r["status"] == "fail"
    assert r["metrics"]["max_abs_logprob"]["value"] > 1e-4


def test_lower_precision_output_is_judged_against_the_cast(tmp_path):
    src, out = _converted("llama", tmp_path, dtype="bfloat16")
    r = written.verify_written(src, out, load_model(str(out)).converted.get("stock_loadable", False),
                               recipe_for_target("rmsnorm").verify)
    assert r["output"]["loaded"] == "unit by unit" and r["status"] == "pass"
    assert r["cast"]["metrics"]["max_abs_logprob"] > 0  # the cast's own error was measured


def test_float64_reference_with_chunked_head_and_table_matches_a_float64_copy(monkeypatch):
    monkeypatch.setattr(roundoff, "CHUNK_BYTES", 8 * 64 * 3)  # every table and head of the tiny model chunked
    model = build_zoo("gpt2").eval()
    ids = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))}
    run = lambda m, b: m(**b, use_cache=False).logits  # noqa: E731
    got = roundoff.float64_output(model, ids, run)
    with torch.no_grad():
        want = run(copy.deepcopy(model).double(), ids)
    assert got.dtype == torch.float64 and next(model.parameters()).dtype == torch.float32
    assert "forward" not in model.lm_head.__dict__ and "forward" not in model.transformer.wte.__dict__
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()


def test_verify_runs_a_convert_output_unit_by_unit_and_other_forms_whole(tmp_path):
    from normsurgeon.verification.api import verify

    src, out = _converted("gpt2", tmp_path)
    r = verify(str(src.path), str(out))
    assert r["status"] == "pass" and r["output"]["loaded"] == "unit by unit"
    stock = verify(str(src.path), str(out), stock=True)
    assert stock["status"] == "pass" and stock["output"]["loaded"] == "unit by unit"
    assert verify("normsurgeon.testing:tiny_gpt2", "normsurgeon.testing:tiny_gpt2")["output"]["loaded"].startswith(
        "whole (not a local folder")
