"""`place` on every Pre-LN / Pre-RMSNorm decoder family, through the anatomy read from the dataflow
(``normsurgeon/placement/anatomy.py``): sequential and parallel blocks, separate and fused q/k/v,
embedding norms, offset gains. Tiny randomised models (hidden 32, 2 layers, vocabulary 96)."""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_zoo import ZOO, build, build_zoo  # noqa: E402

from normsurgeon.cli import app  # noqa: E402
from normsurgeon.errors import UnsupportedModel  # noqa: E402
from normsurgeon.placement.anatomy import find_anatomy  # noqa: E402
from normsurgeon.placement.apply import place  # noqa: E402
from normsurgeon.placement.evaluate import compare  # noqa: E402
from normsurgeon.placement.io import is_placed_folder, load_placed  # noqa: E402
from normsurgeon.placement.run import run_place  # noqa: E402
from normsurgeon.placement.spec import build_spec  # noqa: E402

# family -> (parallel block, fused q/k/v); what the dataflow must show (test data, not a lookup table)
FAMILIES = {
    "gpt2": (False, True), "gpt_neo": (False, False), "gptj": (True, False), "gpt_neox": (True, True),
    "gpt_neox_sequential": (False, True), "gpt_bigcode": (False, True), "opt": (False, False),
    "bloom": (False, True), "falcon": (True, True), "phi": (True, False), "llama": (False, False),
    "mistral": (False, False), "qwen2": (False, False), "gemma": (False, False),
}
_CACHE: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    """A float64 copy of the zoo model (built once per session)."""
    if name not in _CACHE:
        _CACHE[name] = build(name).double().eval()
    return copy.deepcopy(_CACHE[name])


def ids(n: int = 4, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def convert(name: str, scheme: str, **opts):
    src = model(name)
    m = copy.deepcopy(src)
    r = place(m, build_spec(scheme, 2, opts or None), calib_ids=ids(4, 12, 1))
    return src, m, r, compare(src, m, ids(2, 12, 2))


def one_line(e: Exception) -> bool:
    msg = str(e)
    return bool(msg) and "\n" not in msg and len(msg) <= 300


@pytest.mark.parametrize("name", list(FAMILIES))
def test_anatomy_is_read_from_the_dataflow(name):
    a = find_anatomy(model(name))
    parallel, fused = FAMILIES[name]
    assert len(a.blocks) == 2 and all(b.parallel == parallel for b in a.blocks)
    b = a.blocks[0]
    assert [s.kind for s in b.sublayers] == ["attention", "mlp"] and b.unit_residual
    assert b.attention.problem is None and b.attention.fused == fused
    assert b.attn.writer in b.attn.modules and b.mlp.writer in b.mlp.modules
    assert set(b.attention.proj.values()) <= set(b.attn.readers)
    if fused:  # the channel map partitions the fused output into q, k and v heads
        chans = b.attention.channels
        flat = sorted(c for r in ("q", "k", "v") for h in chans[r] for c in h)
        assert flat == list(range(len(flat))) and all(len(h) == b.attention.head_dims[r]
                                                      for r in chans for h in chans[r])
    assert a.final_norm and a.head and a.embedding_writers
    assert bool(a.embedding_norms) == (name == "bloom")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lns_is_exact_on_every_family(name):
    src, m, r, ev = convert(name, "lns")
    assert r.preservation["level"] == "exact"
    assert ev["max_abs_logprob_diff"] <= 1e-12 and abs(ev["delta_loss"]) <= 1e-12
    assert [b.ns_spec.attn.scale for b in (m.get_submodule(x.name) for x in find_anatomy(src).blocks)] == \
        pytest.approx([1.0, 2 ** -0.5])


# Each scheme on a parallel-block family (Falcon: one shared norm, fused multi-query qkv; GPT-J: separate q/k/v)
# and a fused-qkv sequential one (BLOOM: embedding norm, ALiBi, eager attention): calibrated, or refused in one line.
SCHEMES = ["pre", "post", "peri", "mix", "deepnorm", "hybridnorm", "qk-norm", "dyt", "output-only"]
REFUSED = {("falcon", "hybridnorm"), ("gptj", "hybridnorm")}  # HybridNorm's FFN residual needs a sequential block


@pytest.mark.parametrize("name", ["falcon", "gptj", "bloom"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_schemes_on_parallel_and_fused_families(name, scheme):
    if (name, scheme) in REFUSED:
        src = model(name)
        with pytest.raises(UnsupportedModel, match="parallel block") as e:
            place(src, build_spec(scheme, 2), calib_ids=ids())
        assert one_line(e.value) and not any(hasattr(x, "ns_spec") for x in src.modules())  # nothing changed
        return
    opts = {"alpha": 0.5} if scheme == "mix" else {}
    _, m, r, ev = convert(name, scheme, **opts)
    assert math.isfinite(ev["delta_loss"]) and math.isfinite(ev["max_abs_logit_diff"])
    want = {"pre": "exact", "peri": "approximate after calibration", "dyt": "approximate after calibration"}
    assert r.preservation["level"] == want.get(scheme, "not function-preserving")
    if scheme == "pre":
        assert ev["max_abs_logit_diff"] == 0.0
    fresh = model(name)
    place(fresh, build_spec(scheme, 2, opts or None), mode="fresh")
    assert torch.isfinite(fresh(input_ids=ids()).logits).all()


def test_post_ln_on_a_parallel_block_normalises_the_one_sum():
    m = model("falcon")
    place(m, build_spec("post", 2), mode="fresh")  # unit gains, zero shifts
    outs = []
    hs = [m.transformer.h[i].register_forward_hook(lambda mod, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
          for i in range(2)]
    m(input_ids=ids())
    for h in hs:
        h.remove()
    for out in outs:  # x' = LN(x + attn(x) + mlp(x)): each block's output is a unit LayerNorm output
        c = out - out.mean(-1, keepdim=True)
        assert torch.allclose(c.pow(2).mean(-1).sqrt(), torch.ones(out.shape[:-1], dtype=out.dtype), atol=1e-3)
    assert isinstance(m.transformer.h[0].input_layernorm, torch.nn.Identity) and hasattr(m.transformer.h[0], "resid_norm")


@pytest.mark.parametrize("name", ["bloom", "falcon", "gpt_bigcode"])
def test_qk_norm_on_fused_qkv_normalises_the_q_and_k_heads_at_their_channels(name):
    m = model(name)
    place(m, build_spec("hybridnorm" if name == "bloom" else "qk-norm", 2), mode="fresh")  # unit per-head norms
    a = find_anatomy(model(name)).blocks[0].attention
    proj = m.get_submodule(a.proj["q"])  # a Linear (Falcon, BLOOM, BigCode)
    got = []
    h = proj.register_forward_hook(lambda mod, args, out: got.append((args[0], out)))
    m(input_ids=ids())
    h.remove()
    x, out = got[0]
    raw = torch.nn.functional.linear(x, proj.weight, proj.bias)
    for role in ("q", "k", "v"):
        idx = torch.tensor(a.channels[role]).reshape(-1)
        hd = a.head_dims[role]
        heads = raw[..., idx].unflatten(-1, (-1, hd))
        normed = torch.nn.functional.rms_norm(heads, (hd,), eps=1e-5).flatten(-2)  # unit per-head RMSNorm
        want = normed if role != "v" or name == "bloom" else raw[..., idx]  # hybridnorm normalises v as well
        torch.testing.assert_close(out[..., idx], want, rtol=1e-6, atol=1e-6)


def test_deepnorm_init_scales_the_value_channels_of_a_fused_projection():
    ref, m = model("falcon"), model("falcon")
    place(m, build_spec("deepnorm", 2), mode="fresh")
    beta = (8 * 2) ** -0.25
    a = find_anatomy(ref).blocks[1].attention
    w, w0 = m.get_submodule(a.proj["v"]).weight, ref.get_submodule(a.proj["v"]).weight  # Linear [out, in]
    v = torch.tensor(a.channels["v"]).reshape(-1)
    qk = torch.tensor([c for r in ("q", "k") for hd in a.channels[r] for c in hd])
    torch.testing.assert_close(w[v], w0[v] * beta)
    torch.testing.assert_close(w[qk], w0[qk])
    blk, rblk = m.transformer.h[1], ref.transformer.h[1]
    for name in ("self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
        torch.testing.assert_close(blk.get_submodule(name).weight, rblk.get_submodule(name).weight * beta)


def test_peri_on_a_parallel_block_calibrates_both_output_norms_and_survives_deepcopy():
    _, m, r, ev = convert("gpt_neox", "peri")  # parallel, two input norms, fused qkv
    blk = m.gpt_neox.layers[0]
    g1, g2 = blk.post_norm1.weight, blk.post_norm2.weight
    assert g1.std() == 0 and g2.std() == 0 and g1[0] != g2[0] and g1[0] != 1  # one calibrated scalar each
    twin = copy.deepcopy(m)  # the hooks travel with the copy and point at the copy's own norms
    x = ids()
    torch.testing.assert_close(twin(input_ids=x).logits, m(input_ids=x).logits)
    with torch.no_grad():
        twin.gpt_neox.layers[0].post_norm1.weight.mul_(3)
    assert not torch.allclose(twin(input_ids=x).logits, m(input_ids=x).logits)


def test_embedding_norm_in_front_of_block0_on_bloom_and_offset_gains_on_gemma():
    _, m, r, _ = convert("bloom", "peri", embedding_norm=True)
    assert hasattr(m.transformer, "embed_norm") and r.spec.embedding_norm
    _, g, r, ev = convert("gemma", "post")  # Gemma's (1 + w) gains: a Post-LN norm copied from an input norm
    src = model("gemma")
    torch.testing.assert_close(g.model.layers[0].resid_norm1.weight, src.model.layers[0].post_attention_layernorm.weight)
    torch.testing.assert_close(g.model.layers[0].resid_norm2.weight, src.model.layers[1].input_layernorm.weight)
    assert math.isfinite(ev["delta_loss"]) and r.notes  # block 0's input norm moved onto the embeddings
    torch.testing.assert_close(g.model.embed_norm.weight, src.model.layers[0].input_layernorm.weight)


def test_refusals_are_one_line():
    for name, hint in (("opt_post_ln", "not Pre-LN"), ("bert", "not Pre-LN"), ("olmo2", "not Pre-LN")):
        with pytest.raises(UnsupportedModel, match=hint) as e:
            find_anatomy(build_zoo(name))
        assert one_line(e.value)


def test_a_scaled_residual_is_found_by_the_probe_and_only_residual_rewrites_are_refused():
    import transformers as T
    from model_zoo import randomise

    torch.manual_seed(0)  # Granite: x + 0.5 * F(N(x))
    cfg = T.GraniteConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, residual_multiplier=0.5, bos_token_id=0,
                          eos_token_id=0)
    src = randomise(T.GraniteForCausalLM(cfg)).double()
    a = find_anatomy(src)
    assert not any(b.unit_residual for b in a.blocks)
    m = copy.deepcopy(src)
    place(m, build_spec("lns", 2), anatomy=a)
    assert compare(src, m, ids())["max_abs_logprob_diff"] <= 1e-12
    with pytest.raises(UnsupportedModel, match="scaled or gated residual") as e:
        place(copy.deepcopy(src), build_spec("post", 2), anatomy=a)
    assert one_line(e.value)


def test_routed_experts_are_one_sublayer():
    src = build_zoo("mixtral")  # float32: the grouped expert matmul has no float64 kernel
    a = find_anatomy(src)
    mlp = a.blocks[0].mlp
    assert mlp.output == "model.layers.0.mlp" and mlp.experts and mlp.readers == ["model.layers.0.mlp.gate"]
    for scheme, level in (("lns", "exact"), ("peri", "approximate after calibration"), ("post", "not function-preserving")):
        m = copy.deepcopy(src)
        r = place(m, build_spec(scheme, 2), calib_ids=ids(4, 12, 1), anatomy=a)
        ev = compare(src, m, ids(2, 12, 2))
        assert r.preservation["level"] == level and math.isfinite(ev["delta_loss"])
        if scheme == "lns":
            assert ev["max_abs_logprob_diff"] < 1e-5  # float32 round-off


# -- the CLI on OPT (position offset, final norm named like a block norm) and Falcon (parallel, fused qkv) -------

TEXT = "X = (A + B) * 3 - C / 7;\nPRINT(X, 'OK')\n" * 200  # bytes < 96: fits the vocabulary
KW = ["--tokenizer", "bytes", "--calib-seqs", "2", "--eval-seqs", "2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    (root / "data.txt").write_text(TEXT)
    for name in ("opt", "falcon"):
        build(name).save_pretrained(root / name)
    return root


def test_cli_place_on_opt(folders, tmp_path):
    runner = CliRunner()
    data = str(folders / "data.txt")
    res = runner.invoke(app, ["place", str(folders / "opt"), "--scheme", "lns", "--data", data, *KW,
                              "--seq-len", "500", "-o", str(tmp_path / "lns"), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["preservation"]["level"] == "exact" and abs(r["evaluation"]["delta_loss"]) < 1e-5
    assert r["evaluation"]["windows"] == [2, 64]  # capped at the position table (64 positions after the offset)
    assert "final norm `model.decoder.final_layer_norm`" in r["anatomy"]
    src, back = build("opt").eval(), load_placed(tmp_path / "lns").model
    x = ids(2, 64)
    torch.testing.assert_close(back(input_ids=x).logits, src(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    pre = runner.invoke(app, ["place", str(folders / "opt"), "--scheme", "pre", "--data", data, *KW, "--seq-len", "16",
                              "-o", str(tmp_path / "pre"), "--json"])
    assert pre.exit_code == 0, pre.output  # unchanged: written as the stock source class, reload-checked
    written = json.loads(pre.stdout)["output"]
    assert written["stock"] and written["class"] == "OPTForCausalLM"
    qk = runner.invoke(app, ["place", str(folders / "opt"), "--scheme", "qk-norm", "--data", data, *KW,
                             "--seq-len", "32", "-o", str(tmp_path / "qk"), "--json"])
    assert qk.exit_code == 0, qk.output
    names = [n for n, _ in load_placed(tmp_path / "qk").model.named_modules()]
    assert is_placed_folder(tmp_path / "qk") and "model.decoder.layers.1.self_attn.q_norm" in names


def test_cli_place_on_falcon(folders, tmp_path):
    runner = CliRunner()
    data = str(folders / "data.txt")
    out = tmp_path / "peri"
    res = runner.invoke(app, ["place", str(folders / "falcon"), "--scheme", "peri", "--data", data, *KW,
                              "--seq-len", "32", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["preservation"]["level"] == "approximate after calibration" and not r["output"]["stock"]
    assert "parallel" in r["anatomy"] and "fused" in r["anatomy"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "normsurgeon_falcon"
    again = run_place(str(folders / "falcon"), None, scheme="peri", data=data, tokenizer="bytes",
                      calib_sequences=2, eval_sequences=2, seq_len=32, dry_run=True)
    x = ids(2, 16)
    torch.testing.assert_close(load_placed(out).model(input_ids=x).logits, again["model_object"](input_ids=x).logits)
    bad = runner.invoke(app, ["place", str(folders / "falcon"), "--scheme", "hybridnorm", "--data", data, *KW,
                              "--seq-len", "32", "-o", str(tmp_path / "hy")])
    assert bad.exit_code == 4 and "parallel block" in bad.output and not (tmp_path / "hy").exists()
    assert len([ln for ln in bad.output.strip().splitlines() if ln.strip()]) == 1  # refused before any work
    (tmp_path / "low.txt").write_text("lowercase bytes are >= 96\n" * 200)
    oov = runner.invoke(app, ["place", str(folders / "falcon"), "--scheme", "lns", "--data", str(tmp_path / "low.txt"),
                              *KW, "--seq-len", "16", "--dry-run"])
    assert oov.exit_code == 2 and "vocabulary" in oov.output  # not an index error deep in the embedding
    mix = runner.invoke(app, ["place", str(folders / "falcon"), "--blocks", "post@0:1,pre+lns+qk@1:", "--data", data,
                              *KW, "--seq-len", "32", "-o", str(tmp_path / "mix"), "--json"])
    assert mix.exit_code == 0, mix.output
    assert json.loads(mix.stdout)["blocks"] == ["post", "pre+lns+qk"]


def test_zoo_factories_named_here_exist():
    assert set(FAMILIES) <= set(ZOO)
