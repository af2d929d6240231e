"""remove-ln and diagnose across decoder families (issue 10): OPT (position offset), GPT-J (parallel
block), MPT (ALiBi sized by ``max_seq_len``), BLOOM (embedding LayerNorm baked into its table) and more.

Each family's tiny random model (randomised norms and biases) goes through ``remove_ln`` calibrate-only;
the report's own float64 measurement of the native form against the fake-norm model must be <= 1e-10,
and every form the structure allows must be written (the stock form needs a config key that sets
exactly the removed norms' epsilon: OPT hard-codes its LayerNorm epsilon)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from model_zoo import build
from normsurgeon.diagnose.run import max_positions, run_diagnose
from normsurgeon.errors import UnsupportedModel
from normsurgeon.io.loader import load_model
from normsurgeon.lnfree.run import RemoveLnOptions, remove_ln
from normsurgeon.lnfree.sites import find_sites

TEXT = "DEF F(X):\n    RETURN X + 1\nA = (B, 2)  # C\n" * 120  # bytes < 96 (the zoo's vocabulary)
# family -> whether the stock (eps-trick) form exists
FAMILIES = {"opt": False, "gptj": True, "mpt": True, "bloom": True, "gpt2": True, "gpt_neox": True,
            "falcon": True, "phi": True, "gpt_bigcode": True, "llama": True}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(TEXT)
    return str(path)


def _remove(folder, out, text, **overrides):
    opts = RemoveLnOptions(data=text, tokenizer="bytes",
                           overrides={"block_size": 16, "batch_size": 2, "eval_windows": 2, **overrides})
    return remove_ln(str(folder), out, opts)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_remove_ln_calibrate_only(family, saved_family, text, tmp_path):
    out = tmp_path / "out"
    r = _remove(saved_family(family), out, text)
    assert r["status"] == "ok"
    native = r["export"]["native"]
    assert native["float64_vs_fake"] <= 1e-10
    stock = r["export"]["stock"]
    if FAMILIES[family]:
        assert stock["float64_vs_fake"] <= 1e-4 and stock["written_vs_native"]["max_abs_logprob"] <= 1e-4
        assert (out / "config.json").is_file() and (out / "native" / "config.json").is_file()
        assert native["path"] == "native"  # relative to the output folder
    else:
        assert "epsilon" in stock["why_not"] and (out / "config.json").is_file()
    assert json.loads((out / "lnfree_report.json").read_text())["export"]["native"]["float64_vs_fake"] <= 1e-10


def test_bloom_embedding_norm_is_baked(saved_family, text, tmp_path):
    """The embedding LayerNorm goes into the (untied) table; stock and native forms load and agree."""
    r = _remove(saved_family("bloom"), tmp_path / "out", text)
    assert r["sigmas"]["transformer.word_embeddings_layernorm"]["role"] == "embedding"
    assert "transformer.word_embeddings_layernorm" in r["export"]["native"]["identity"]
    stock = T.BloomForCausalLM.from_pretrained(tmp_path / "out").eval()  # stock transformers
    native = load_model(str(tmp_path / "out" / "native")).model.eval()
    assert not stock.config.tie_word_embeddings and not native.config.tie_word_embeddings
    assert stock.lm_head.weight.data_ptr() != stock.transformer.word_embeddings.weight.data_ptr()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = stock(input_ids=ids).logits.log_softmax(-1), native(input_ids=ids).logits.log_softmax(-1)
    assert (a - b).abs().max() < 1e-4


def test_block_size_clamped_to_positions(saved_family, text, tmp_path):
    """OPT's table holds 64 positions after its offset of 2: a longer block size is cut to 64, not a crash."""
    r = _remove(saved_family("opt"), tmp_path / "out", text, block_size=100, eval_windows=1)
    assert r["recipe"]["train"]["block_size"] == 64
    assert any("exceeds the model's 64 positions" in n for n in r["notes"])


def test_mpt_position_limit():
    assert max_positions(build("mpt")) == 64  # MptConfig.max_seq_len (the ALiBi bias length)


def test_refusals_are_one_line():
    with pytest.raises(UnsupportedModel) as e:
        find_sites(build("opt_post_ln"))
    msg = str(e.value)
    assert msg.startswith("cannot remove the norms: Post-LN:") and len(msg) <= 320 and "first `" in msg
    assert len(e.value.details["reasons"]) >= 3


@pytest.mark.parametrize("family", ["mpt", "opt", "bloom"])
def test_diagnose_runs(family, saved_family, text, tmp_path):
    """Default --seq-len (512) is cut to the model's positions (MPT: 64)."""
    r = run_diagnose(str(saved_family(family)), text, tmp_path / "d", num_sequences=2, micro_batch=2,
                     tokenizer="bytes", plots=False)
    assert r["seq_len"] == (64 if family != "bloom" else 512) and len(r["layers"]) == 2
    assert all(layer["removal_delta_loss"] == layer["removal_delta_loss"] for layer in r["layers"])  # not NaN
