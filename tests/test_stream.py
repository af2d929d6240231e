"""Streaming conversion: header-only plans, bit-identical tensors vs in-memory convert, kill + resume,
and layer-by-layer verification, on small sharded checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model_zoo import build
from normsurgeon.conversion import convert
from normsurgeon.errors import InputError, ResourceError, UsageError
from normsurgeon.stream import plan_streaming, stream_convert
from normsurgeon.verification.layerwise import verify_layerwise
from normsurgeon.stream.execute import partial_folder

FAMILIES = ["gpt2", "opt", "bloom", "gpt_neox", "falcon", "phi", "vit"]


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    cache: dict[tuple, Path] = {}

    def get(family: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (family, dtype)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"sharded-{family}")
            build(family).to(dtype).save_pretrained(folder, max_shard_size="40KB")
            cache[key] = folder
        return cache[key]

    return get


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _same_folder(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("family,target,policy", [(f, "rmsnorm", "stock") for f in FAMILIES] +
                         [("gpt2", "crmsnorm", "fold-all"), ("opt", "rmsnorm", "fold-all"),
                          ("bloom", "crmsnorm", "fold-all"), ("vit", "crmsnorm", "fold-all")])
def test_stream_matches_in_memory_bit_for_bit(family, target, policy, sharded, tmp_path):
    src = sharded(family)
    assert len(list(src.glob("*.safetensors"))) > 1  # really sharded
    ref = convert(str(src), tmp_path / "mem", to=target, bias_policy=policy, run_verify=False)
    rep = stream_convert(src, tmp_path / "stream", to=target, bias_policy=policy, max_shard_size="30KB",
                         verify="layerwise")
    assert rep["status"] == "pass", rep["metrics"]
    _same_folder(tmp_path / "mem", tmp_path / "stream")
    cfg_mem = json.loads((tmp_path / "mem" / "config.json").read_text())
    cfg_str = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert cfg_mem == cfg_str
    assert rep["stock_loadable"] == ref["stock_loadable"]
    assert len(rep["per_layer"]) == 2 and all(p["local_rel_l2"] < 1e-4 for p in rep["per_layer"])
    assert len(list((tmp_path / "stream").glob("model-*.safetensors"))) > 1
    assert not partial_folder(tmp_path / "stream").exists()


def test_direct_and_buffered_writes_give_the_same_files(sharded, tmp_path):
    src = sharded("gpt2")
    d = stream_convert(src, tmp_path / "direct", max_shard_size="30KB", verify="none", direct_io=True)
    b = stream_convert(src, tmp_path / "buffered", max_shard_size="30KB", verify="none", direct_io=False)
    assert b["streaming"]["direct_io"] is False
    names = sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    assert len(names) > 1 and names == sorted(p.name for p in (tmp_path / "buffered").glob("*.safetensors"))
    for n in names:
        assert (tmp_path / "direct" / n).read_bytes() == (tmp_path / "buffered" / n).read_bytes(), n
    if not d["streaming"]["direct_io"]:
        pytest.skip("this file system refuses O_DIRECT: both runs wrote through the page cache")


def test_stream_bfloat16_and_dtype_cast(sharded, tmp_path):
    src = sharded("gpt2", torch.bfloat16)
    convert(str(src), tmp_path / "mem", run_verify=False)
    stream_convert(src, tmp_path / "stream", verify="none")
    _same_folder(tmp_path / "mem", tmp_path / "stream")
    src32 = sharded("opt")
    convert(str(src32), tmp_path / "mem16", dtype="bfloat16", run_verify=False)
    stream_convert(src32, tmp_path / "s16", dtype="bfloat16", verify="none")
    _same_folder(tmp_path / "mem16", tmp_path / "s16")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "vit"] + ["gptj", "gpt_neo", "gpt_bigcode"])
def test_probe_with_fewer_tokens_plans_the_same(family, sharded, tmp_path, monkeypatch):
    """The probe's vocabulary is cut to PROBE_VOCAB (memory); the plan must not change because of it."""
    import normsurgeon.stream.skeleton as skeleton

    src = sharded(family)
    full = plan_streaming(src, "rmsnorm", read_shifts=True)
    monkeypatch.setattr(skeleton, "PROBE_VOCAB", 8)
    small = plan_streaming(src, "rmsnorm", read_shifts=True)
    assert full.config["vocab_size"] > 8
    assert skeleton.probe_model(full.config).get_input_embeddings().weight.shape[0] == max(
        8, (full.config.get("pad_token_id") or 0) + 1)
    assert small.fingerprint() == full.fingerprint()
    assert small.to_dict() == full.to_dict()


def test_zero_norm_shifts_are_read_and_folded(tmp_path):
    """With every LayerNorm shift zero, the conversion reads the shifts and folds ln_f's gain into the
    bias-less lm_head, which a dry run (headers only, shifts assumed non-zero) must keep on the norm under
    the stock policy; the result still equals convert()."""
    model = build("gpt2")
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.bias.zero_()
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    dry = plan_streaming(tmp_path / "src", "rmsnorm")
    read = plan_streaming(tmp_path / "src", "rmsnorm", read_shifts=True)
    assert dry.assumed_nonzero_shifts and not read.assumed_nonzero_shifts
    folded = lambda p: sum(f.fold_gain for f in p.rms_plan.folds)  # noqa: E731
    kept = lambda p: [f.norm for f in p.rms_plan.folds if not f.fold_gain]  # noqa: E731
    assert kept(dry) == ["transformer.ln_f"] and kept(read) == []
    assert folded(read) == len(read.rms_plan.folds) == folded(dry) + 1
    convert(str(tmp_path / "src"), tmp_path / "mem", run_verify=False)
    rep = stream_convert(tmp_path / "src", tmp_path / "stream", verify="whole")
    assert rep["status"] == "pass" and rep["plan"]["folded_norms"] == folded(read)
    _same_folder(tmp_path / "mem", tmp_path / "stream")


def test_dry_run_plan_accounts_for_every_tensor(sharded):
    src = sharded("gpt2")
    plan = plan_streaming(src, "rmsnorm")
    d = plan.to_dict()
    inv = d["inventory"]
    names = {t for g in d["groups"] for t in g["tensors"]}
    assert set(inv["transformed"]) | set(inv["copied"]) | set(inv["added"]) == names
    assert inv["added"] == ["lm_head.weight"] and inv["dropped"] == []
    assert [g["name"] for g in d["groups"]] == ["embeddings", "transformer.h.0", "transformer.h.1", "head"]
    assert d["memory"]["peak_bytes"] > 0 and d["assumed_nonzero_shifts"]
    assert "fold" in d["groups"][1]["tensors"]["transformer.h.0.attn.c_attn.weight"]
    json.dumps(d)  # --json must serialise


def test_unaccounted_tensor_and_bad_index_are_errors(sharded, tmp_path):
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(sharded("gpt2"), src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    save_file({"stray.weight": torch.zeros(3)}, str(src / "extra.safetensors"))
    index["weight_map"]["stray.weight"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="not accounted for"):
        plan_streaming(src, "rmsnorm")
    index["weight_map"]["transformer.h.0.ln_1.weight"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="lacks"):
        plan_streaming(src, "rmsnorm")


def test_max_memory_refuses_before_writing(sharded, tmp_path):
    with pytest.raises(ResourceError) as e:
        stream_convert(sharded("gpt2"), tmp_path / "o", max_memory="1MB")
    assert e.value.exit_code == 6
    assert not (tmp_path / "o").exists() and not partial_folder(tmp_path / "o").exists()


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from normsurgeon.stream import stream_convert
    n = int(sys.argv[3])
    seen = []
    def done(group):
        seen.append(group)
        if len(seen) == n:
            os.kill(os.getpid(), signal.SIGKILL)
    stream_convert(sys.argv[1], sys.argv[2], max_shard_size="30KB", verify="none", on_group_done=done)
""")


def test_kill_midway_then_resume_is_identical(sharded, tmp_path):
    src = sharded("opt")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(src), str(out), "2"],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()  # nothing at the destination
    progress = json.loads((partial_folder(out) / "progress.json").read_text())
    assert len(progress["done"]) == 2
    rep = stream_convert(src, out, max_shard_size="30KB", verify="none", resume=True)
    assert rep["streaming"]["resumed_groups"] == 2
    stream_convert(src, tmp_path / "ref", max_shard_size="30KB", verify="none")
    _same_folder(out, tmp_path / "ref")
    for f in out.glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "ref" / f.name).read_bytes()
    assert not partial_folder(out).exists() and not (out / "progress.json").exists()


def test_injected_failure_keeps_partial_and_resume_after_option_change_restarts(sharded, tmp_path):
    src = sharded("gpt2")
    out = tmp_path / "out"

    def boom(group):
        if group == "transformer.h.0":
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        stream_convert(src, out, verify="none", on_group_done=boom)
    assert not out.exists() and partial_folder(out).exists()
    # A different output dtype changes the plan: --resume must not reuse the old groups.
    rep = stream_convert(src, out, verify="none", resume=True, dtype="float64")
    assert rep["streaming"]["resumed_groups"] == 0
    with pytest.raises(UsageError):
        stream_convert(src, out, verify="none")


def test_layerwise_verify_localises_a_bad_fold(sharded, tmp_path):
    src = sharded("gpt2")
    out = tmp_path / "out"
    stream_convert(src, out, verify="none")
    shard = next(out.glob("model*.safetensors"))
    tensors = _tensors(out)
    key = "transformer.h.1.mlp.c_fc.weight"
    owner = next(f for f in out.glob("*.safetensors") if key in safe_open(str(f), "pt").keys())
    from safetensors.torch import save_file

    with safe_open(str(owner), "pt") as sf:
        part = {k: sf.get_tensor(k) for k in sf.keys()}
        meta = sf.metadata()
    part[key] = part[key] * 1.5
    save_file(part, str(owner), metadata=meta)
    rep = verify_layerwise(src, out)
    assert rep["status"] == "fail"
    local = {p["point"]: p["local_rel_l2"] for p in rep["per_layer"]}
    assert local["transformer.h.0"] < 1e-5 < local["transformer.h.1"]
    assert shard.exists() and tensors


def test_row_chunks_are_bit_identical(sharded, tmp_path, monkeypatch):
    """Whole tensors (default chunk size) and one row per chunk give the same files."""
    import normsurgeon.stream.budget as budget

    for family, target in (("gpt2", "rmsnorm"), ("gpt2", "crmsnorm"), ("opt", "rmsnorm")):
        src = sharded(family)
        convert(str(src), tmp_path / f"mem-{family}-{target}", to=target, run_verify=False)
        with monkeypatch.context() as mp:
            mp.setattr(budget, "CHUNK_BYTES", 300)  # one row per chunk
            stream_convert(src, tmp_path / f"s-{family}-{target}", to=target, verify="none")
        _same_folder(tmp_path / f"mem-{family}-{target}", tmp_path / f"s-{family}-{target}")


def test_cli_dry_run_stream_and_layerwise_verify(sharded, tmp_path):
    from typer.testing import CliRunner

    from normsurgeon.cli import app

    runner = CliRunner()
    src = sharded("gpt2")
    r = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "o"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["inventory"]["counts"]["checkpoint"] == len(json.loads(
        (src / "model.safetensors.index.json").read_text())["weight_map"])
    assert not (tmp_path / "o").exists()
    r = runner.invoke(app, ["plan", str(src)])
    assert r.exit_code == 0 and "estimated peak memory" in r.output
    r = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "o"), "--dry-run", "--max-memory", "10MB"])
    assert r.exit_code == 6 and "above --max-memory" in r.output
    r = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "o"), "--stream", "--max-shard-size", "30KB",
                            "--verify-mode", "layerwise"])
    assert r.exit_code == 0, r.output
    assert "by streaming" in r.output and len(list((tmp_path / "o").glob("model-*.safetensors"))) > 1
    r = runner.invoke(app, ["verify", str(src), str(tmp_path / "o"), "--layerwise", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["status"] == "pass"


def test_deep_model_plan_generalises_from_a_two_block_probe(tmp_path):
    import transformers as T

    cfg = T.OPTConfig(vocab_size=96, max_position_embeddings=64, hidden_size=32, num_hidden_layers=5,
                      num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0,
                      pad_token_id=1)
    torch.manual_seed(0)
    from model_zoo import randomise

    randomise(T.OPTForCausalLM(cfg)).save_pretrained(tmp_path / "src", max_shard_size="40KB")
    plan = plan_streaming(tmp_path / "src", "rmsnorm")
    assert len([g for g in plan.groups if g.name.startswith("model.decoder.layers.")]) == 5
    convert(str(tmp_path / "src"), tmp_path / "mem", run_verify=False)
    stream_convert(tmp_path / "src", tmp_path / "stream", verify="none")
    _same_folder(tmp_path / "mem", tmp_path / "stream")


def test_streamed_whole_verification_takes_an_explicit_threshold(sharded, tmp_path):
    """--max-logprob-delta with --stream: recorded and applied (a tiny one fails, nothing written)."""
    from normsurgeon.errors import UsageError, VerificationFailed

    src = sharded("gpt2")
    r = stream_convert(src, tmp_path / "ok", verify="whole", max_logprob_delta=1e-3)
    assert r["status"] == "pass" and r["explicit_threshold"] == {"max_abs_logprob": 1e-3}
    assert r["metrics"]["max_abs_logprob"]["threshold"] == 1e-3
    with pytest.raises(VerificationFailed):
        stream_convert(src, tmp_path / "strict", verify="whole", max_logprob_delta=1e-30)
    assert not (tmp_path / "strict").exists()
    with pytest.raises(UsageError):
        stream_convert(src, tmp_path / "lw", verify="layerwise", max_logprob_delta=1e-3)
