"""The CLI: one-line errors with documented exit codes, nothing written on failure, JSON output."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from model_zoo import build
from normsurgeon.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(map(str, args)))
    return result.exit_code, result.output


def run_json(*args):
    """(exit code, stdout only, stderr): --json documents are on stdout, the one error line on stderr."""
    result = runner.invoke(app, list(map(str, args)))
    return result.exit_code, result.stdout, result.stderr


def _one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def test_missing_folder_exit_5(tmp_path):
    code, out = run("convert", tmp_path / "nope", "-o", tmp_path / "o")
    assert code == 5 and "no such model folder" in _one_line_error(out)
    assert not (tmp_path / "o").exists()


def test_hub_id_not_in_cache_exit_5(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out = run("inspect", "someorg/not-a-cached-model")
    assert code == 5 and "hf download" in _one_line_error(out)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_exit_5(saved_family, tmp_path):
    bad = _copy(saved_family("gpt2"), tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, out = run("convert", bad, "-o", tmp_path / "o")
    assert code == 5 and "safetensors" in _one_line_error(out)
    assert not (tmp_path / "o").exists()


def test_corrupt_config_exit_5(saved_family, tmp_path):
    bad = _copy(saved_family("gpt2"), tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    code, out = run("inspect", bad)
    assert code == 5 and "config.json" in _one_line_error(out)


def test_config_and_weights_disagree_exit_5(saved_family, tmp_path):
    bad = _copy(saved_family("gpt2"), tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_embd"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    code, out = run("convert", bad, "-o", tmp_path / "o")
    assert code == 5 and "disagree" in _one_line_error(out)
    assert not (tmp_path / "o").exists()


def test_pickle_refused_then_allowed(tmp_path):
    folder = tmp_path / "pkl"
    model = build("gpt2")
    model.save_pretrained(folder, safe_serialization=False) if False else model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    code, out = run("inspect", folder)
    assert code == 5 and "--allow-pickle" in _one_line_error(out)
    code, out = run("convert", folder, "-o", tmp_path / "o", "--allow-pickle")
    assert code == 0, out
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_unsupported_post_ln_exit_4_nothing_written(tmp_path):
    folder = tmp_path / "opt-post"
    build("opt_post_ln").save_pretrained(folder)
    code, out = run("convert", folder, "-o", tmp_path / "o")
    assert code == 4 and "Post-LN" in _one_line_error(out)
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.partial*"))


def test_inspect_explains_post_ln_refusal(tmp_path):
    folder = tmp_path / "bert"
    build("bert").save_pretrained(folder)
    code, out = run("inspect", folder, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["placement"] == "post-ln"
    why = " ".join(info["recipes"]["rmsnorm"]["why_not"])
    assert "Post-LN" in why and "normalizes the residual stream itself" in why


def test_existing_output_exit_2_and_kept(saved_family, tmp_path):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, out = run("convert", saved_family("gpt2"), "-o", out_dir)
    assert code == 2 and "--overwrite" in _one_line_error(out)
    assert (out_dir / "keep.txt").read_text() == "mine"
    code, out = run("convert", saved_family("gpt2"), "-o", out_dir, "--overwrite")  # not ours: never replaced
    assert code == 2 and "not a normsurgeon output" in _one_line_error(out)
    assert (out_dir / "keep.txt").read_text() == "mine"
    (out_dir / "keep.txt").unlink()  # an empty folder, or an earlier output, is replaced
    assert run("convert", saved_family("gpt2"), "-o", out_dir, "--overwrite")[0] == 0
    code, out, _ = run_json("convert", saved_family("gpt2"), "-o", out_dir, "--overwrite", "--json")
    assert code == 0
    assert json.loads(out)["status"] == "pass"


def test_bad_target_exit_2(saved_family, tmp_path):
    code, out = run("convert", saved_family("gpt2"), "-o", tmp_path / "o", "--to", "layernorm")
    assert code == 2


def test_invalid_recipe_unknown_key_exit_2(saved_family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("normsurgeon: 1\nname: x\ntarget: rmsnorm\nsteps: [replace_norms]\nfold_everything: yes\n")
    code, out = run("convert", saved_family("gpt2"), "-o", tmp_path / "o", "--recipe", recipe)
    assert code == 2 and "fold_everything" in _one_line_error(out)


def test_verify_detects_a_wrong_checkpoint_exit_3(saved_family, tmp_path):
    out_dir = tmp_path / "o"
    assert run("convert", saved_family("gpt2"), "-o", out_dir)[0] == 0
    from safetensors.torch import load_file, save_file
    state = load_file(out_dir / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.bias"] += 0.05  # a plausible mis-fold in block 1
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    code, out, err = run_json("verify", saved_family("gpt2"), out_dir, "--json")
    assert code == 3
    line = _one_line_error(err)
    assert "max |Δ log-prob|" in line and "threshold" in line and "transformer.ln_f" in line, line
    report = json.loads(out)
    assert report["status"] == "fail"
    bad = {p["point"]: p["resid_rel_l2"] for p in report["per_layer"]}
    assert bad["transformer.h.1.ln_2"] < 1e-5 < bad["transformer.ln_f"]  # located at block 1's MLP


def test_console_script_help_and_version():
    out = subprocess.run([sys.executable, "-m", "normsurgeon.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "normsurgeon" in out.stdout
    code, text = run("convert", "--help")
    assert code == 0 and "Exit codes" in text and "--bias-policy" in text


def test_verify_unrelated_models_exit_5(saved_family, tmp_path):
    import transformers as T

    base = tmp_path / "base"
    T.GPT2Model(build("gpt2").config).save_pretrained(base)  # hidden states, not logits
    code, out = run("verify", saved_family("gpt2"), base)
    assert code == 5 and "not a source and its conversion" in _one_line_error(out)
