"""Issue 12, a new user's first hour: model cards (item 2), the example's tokenizer (3), factories from
another folder (4), report tables, HTML and terminal rendering (9), output hygiene (10)."""
from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

from normsurgeon.io.model_card import split_front_matter, write_model_card
from normsurgeon.io.writer import copy_tagalong_files
from normsurgeon.markdown import md_table

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-gpt2"
TEXT = "DEF F(X):\n    RETURN X + 1\nA = (B, 2)  # C\n" * 120  # bytes < 96 (the tiny models' vocabulary)
SOURCE_CARD = """---
license: mit
language: en
tags: [original-tag]
---
# The original card

Trained on things.

```python
# not a heading
print("x")
```
"""


def _card(folder: Path):
    from huggingface_hub import ModelCard

    text = (folder / "README.md").read_text()
    return ModelCard(text), text


@pytest.fixture()
def gpt2_with_card(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "src"
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(folder)
    (folder / "README.md").write_text(SOURCE_CARD)
    return folder


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(TEXT)
    return str(p)


# -- item 2: model cards -----------------------------------------------------------------------------------
def test_model_card_keeps_the_source_card_below_without_its_front_matter(tmp_path, gpt2_with_card):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    report = {"status": "pass", "metrics": {"max_abs_logprob": {"value": 1e-7, "threshold": 1e-4, "ok": True}}}
    write_model_card(dest, "someorg/model", gpt2_with_card, "rmsnorm", report, True, ["centred the writers"],
                     output_path="out/rms")
    card, text = _card(dest)
    assert card.data.base_model == "someorg/model" and card.data.library_name == "transformers"
    assert card.data.tags == ["normsurgeon", "rmsnorm"] and card.data.license == "mit"
    assert card.data.pipeline_tag == "text-generation"
    assert text.count("\n---\n") == 1 and "original-tag" not in text  # one front matter: ours
    assert "### The original card" in text and "# not a heading" in text  # demoted headings, code kept
    assert 'AutoModelForCausalLM.from_pretrained("out/rms")' in text and "1.000e-07" in text
    assert text.index("## Equivalence") < text.index("## How to load") < text.index("## Source model card")


def test_tagalong_files_leave_the_source_card_to_the_model_card(tmp_path, gpt2_with_card):
    (tmp_path / "dst").mkdir()
    copied = copy_tagalong_files(gpt2_with_card, tmp_path / "dst")
    assert "README.md" not in copied and "generation_config.json" in copied


def test_place_writes_a_card_settings_and_calibrates_on_builtin_text(tmp_path, gpt2_with_card):
    from normsurgeon.placement.run import run_place

    out = tmp_path / "lns"
    r = run_place(str(gpt2_with_card), out, scheme="lns", calib_sequences=2, eval_sequences=2, seq_len=16)
    assert r["data"]["source"].startswith(("built-in sample text", "seeded random token ids"))
    card, text = _card(out)
    assert card.data.base_model == str(gpt2_with_card) and "place" in card.data.tags
    assert "Source model card" in text and "The original card" in text and "Preserves the function" in text
    settings = yaml.safe_load((out / "normsurgeon_recipe.yaml").read_text())
    assert settings["command"] == "place" and settings["settings"]["scheme"] == "lns" and settings["spec"]["blocks"]
    assert "README.md" not in r["output"]["tagalong"]


def test_place_uses_the_builtin_text_on_the_byte_level_example(tmp_path):
    from normsurgeon.placement.run import run_place

    r = run_place(str(EXAMPLE), tmp_path / "o", scheme="lns", calib_sequences=2, eval_sequences=2, seq_len=32)
    assert r["data"]["source"] == "built-in sample text (no --data)" and r["data"]["tokenizer"] == "bytes"
    assert abs(r["evaluation"]["delta_loss"]) < 1e-5 and any("no --data" in n for n in r["notes"])


def test_fold_bn_writes_card_and_settings_with_umask_modes(tmp_path):
    from normsurgeon.batchnorm.run import run_fold_bn

    old = os.umask(0o022)
    try:
        out = tmp_path / "folded"
        run_fold_bn("normsurgeon.batchnorm.examples:conv_bn_net", out, input_shape=(2, 3, 8, 8))
    finally:
        os.umask(old)
    card, text = _card(out)
    assert card.data.library_name == "normsurgeon" and card.data.base_model is None  # a factory is no hub model
    assert "fold-bn" in card.data.tags and "normsurgeon.load" in text
    settings = yaml.safe_load((out / "normsurgeon_recipe.yaml").read_text())
    assert settings["command"] == "fold-bn" and settings["settings"]["input_shape"] == [2, 3, 8, 8]
    assert settings["plan"]["counts"]["folded"] >= 1
    report = json.loads((out / "equivalence_report.json").read_text())
    assert report["deploy_export"]["file"] == "deploy/model.pt2"
    for p in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


def test_staging_gives_files_the_umask_mode(tmp_path):
    """safetensors writes 0600 through its temporary file; the output gets the umask's mode (0664 here)."""
    from safetensors.torch import save_file

    from normsurgeon.io.writer import staging_folder

    old = os.umask(0o002)
    try:
        with staging_folder(tmp_path / "o", overwrite=False) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            assert stat.S_IMODE((tmp / "model.safetensors").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o" / "model.safetensors").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o775


# -- item 10: checkpoints, relative paths ----------------------------------------------------------------
def _remove_ln(src, out, text, **kw):
    from normsurgeon.lnfree.run import RemoveLnOptions, remove_ln

    opts = RemoveLnOptions(data=text, tokenizer="bytes", finetune=True, **kw,
                           overrides={"steps": 4, "block_size": 16, "batch_size": 2, "eval_windows": 2,
                                      "checkpoint_every": 2, "warmup_steps": 1})
    return remove_ln(str(src), out, opts)


def test_remove_ln_removes_its_checkpoints_and_writes_relative_paths_and_a_card(tmp_path, gpt2_with_card, text_file):
    out = tmp_path / "lnfree"
    r = _remove_ln(gpt2_with_card, out, text_file)
    assert not Path(str(out) + ".checkpoints").exists()
    assert r["checkpoints"] == {"kept": False, "folder": None, "subfolders": ["removal"]}
    written = json.loads((out / "lnfree_report.json").read_text())
    assert written["export"]["native"]["path"] == "native" and written["export"]["stock"]["path"] == "."
    assert written["loss_curve"] == "loss_curve.png"
    dumped = json.dumps(written)
    assert str(tmp_path / "lnfree") + "/" not in dumped  # no absolute path of a file in the output
    assert "![training loss per step](loss_curve.png)" in (out / "lnfree_report.md").read_text()
    card, text = _card(out)
    assert card.data.library_name == "transformers" and "remove-ln" in card.data.tags
    assert "`native/`" in text and "The original card" in text


def test_remove_ln_keeps_checkpoints_when_asked(tmp_path, gpt2_with_card, text_file):
    out = tmp_path / "lnfree"
    r = _remove_ln(gpt2_with_card, out, text_file, keep_checkpoints=True)
    ckpt = Path(str(out) + ".checkpoints")
    assert any((ckpt / "removal").glob("step-*.pt"))
    assert r["checkpoints"]["kept"] and r["checkpoints"]["folder"] == "../lnfree.checkpoints"


def test_prepbn_card_and_checkpoints(tmp_path, text_file):
    from normsurgeon.prepbn.run import PRepBNOptions, run_prepbn

    def run(out, **kw):
        return run_prepbn("normsurgeon.testing:tiny_gpt2", out, PRepBNOptions(
            data=text_file, tokenizer="bytes", finetune=True, recalib_batches=2, **kw,
            overrides={"steps": 4, "block_size": 16, "batch_size": 2, "eval_windows": 2, "checkpoint_every": 2}))

    r = run(tmp_path / "a")
    assert not (tmp_path / "a.checkpoints").exists() and r["loss_curve"] == "loss_curve.png"
    card, text = _card(tmp_path / "a")
    assert card.data.library_name == "normsurgeon" and "prepbn" in card.data.tags and "RepBN" in text
    custom = tmp_path / "mine"
    run(tmp_path / "b", keep_checkpoints=True, checkpoint_dir=custom)
    assert any((custom / "prepbn").glob("step-*.pt"))
    run(tmp_path / "c", checkpoint_dir=custom)  # an explicit folder: only our subfolder goes
    assert not (custom / "prepbn").exists() and not custom.exists()


# -- item 3: the example's tokenizer -------------------------------------------------------------------------
def test_example_tokenizer_ids_are_the_bytes():
    from normsurgeon.train.data import is_byte_tokenizer

    tok = T.AutoTokenizer.from_pretrained(str(EXAMPLE))
    text = Path(json.__file__).read_text()[:3000] + "é€😀\x00\x7f\n\t"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok(text)["input_ids"] == ids  # no special tokens added either
    assert is_byte_tokenizer(EXAMPLE)  # recipes read it as bytes: the published protocol, no separators
    cfg = json.loads((EXAMPLE / "config.json").read_text())
    assert cfg["vocab_size"] == 256 and cfg["bos_token_id"] == 10 and cfg["eos_token_id"] is None


def test_example_tokenizer_is_reproducible(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import build_byte_tokenizer
    finally:
        sys.path.remove(str(ROOT / "examples"))
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_text((EXAMPLE / name).read_text())
    build_byte_tokenizer.write(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((EXAMPLE / name).read_text()), name


def test_pipeline_generates_from_the_example_and_its_conversion(tmp_path):
    from normsurgeon.conversion import convert

    out = tmp_path / "rms"
    convert(str(EXAMPLE), out, to="rmsnorm")
    assert (out / "tokenizer.json").is_file()
    for folder in (EXAMPLE, out):
        gen = T.pipeline("text-generation", model=str(folder))
        res = gen("def main(", max_new_tokens=8, do_sample=False)
        assert res[0]["generated_text"].startswith("def main(") and len(res[0]["generated_text"]) > len("def main(")
        assert gen("", max_new_tokens=4, do_sample=False)[0]["generated_text"]  # no prompt: starts from bos


# -- item 4: factories from another folder -------------------------------------------------------------------
def test_factory_from_the_current_folder(tmp_path, monkeypatch):
    from normsurgeon.io.factory import resolve_attribute

    (tmp_path / "my_factories_12.py").write_text("def make():\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert resolve_attribute("my_factories_12:make")() == 42


def test_factory_import_error_says_how_to_fix_it(tmp_path):
    code = ("from normsurgeon.io.factory import resolve_attribute\n"
            "try:\n    resolve_attribute('examples.tiny_cnn.model:pretrained')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\nelse:\n    print('loaded')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    line = res.stdout.strip()
    assert line.startswith("InputError") and "\n" not in line and f"PYTHONPATH={ROOT}" in line, line
    ok = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                        capture_output=True, text=True)
    assert ok.stdout.strip() == "loaded", ok.stdout + ok.stderr


def test_factory_with_a_missing_dependency_names_it(tmp_path, monkeypatch):
    from normsurgeon.errors import InputError
    from normsurgeon.io.factory import resolve_attribute

    (tmp_path / "needs_dep_12.py").write_text("import no_such_dependency_12\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="importing 'needs_dep_12' failed.*no_such_dependency_12"):
        resolve_attribute("needs_dep_12:make")


# -- item 9: reports -----------------------------------------------------------------------------------------
def _cells(row: str) -> list[str]:
    return re.split(r"(?<!\\)\|", row.strip())[1:-1]


def test_markdown_table_escapes_cells():
    table = md_table(["a|b", "c"], [["x | y", "1\n2"], ["`p|q`", None]]).splitlines()
    assert all(len(_cells(r)) == 2 for r in table) and "1<br>2" in table[2]


def test_diagnose_report_table_html_and_plots(tmp_path, text_file, monkeypatch):
    from normsurgeon.diagnose import plots
    from normsurgeon.diagnose.run import run_diagnose

    seen = []
    original = plots._save

    def spy(fig, path, title, plt):
        for ax in fig.axes:
            if ax.get_label() != "<colorbar>":
                seen.append((path.name, ax.get_xlabel(), ax.get_ylabel(), ax.get_title()))
        return original(fig, path, title, plt)

    monkeypatch.setattr(plots, "_save", spy)
    out = tmp_path / "diag"
    run_diagnose("normsurgeon.testing:tiny_gpt2", text_file, out, num_sequences=2, seq_len=16, tokenizer="bytes",
                 log=None)
    md = (out / "report.md").read_text().splitlines()
    rows = [r for r in md if r.startswith("|")]
    assert rows and len({len(_cells(r)) for r in rows}) == 1  # `top1/median |h|` no longer splits a cell
    html = (out / "report.html").read_text()
    srcs = re.findall(r"src='([^']*)'", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained
    assert "max-width:100%" in html and "max-width:540px" not in html
    assert seen and all(x for name, x, y, t in seen), seen  # every plot has an x label...
    by_file = {}
    for name, x, y, t in seen:
        by_file.setdefault(name, []).append((y, t))
    assert all(any(y for y, _ in v) and any(t for _, t in v) for v in by_file.values()), by_file  # ...y label, title


def test_report_render_names_images_instead_of_printing_markdown(tmp_path):
    from rich.console import Console

    from normsurgeon.report_render import render_report

    p = tmp_path / "lnfree_report.md"
    p.write_text("# remove-ln report\n\n" + md_table(["norm", "sigma"], [["`h.0.ln_1`", "1.5"]]) +
                 "\n\n![training loss per step](loss_curve.png)\n")
    console = Console(file=io.StringIO(), width=400, color_system=None)
    render_report(p, console)
    shown = console.file.getvalue()
    assert "![" not in shown and "| ---" not in shown and "# remove-ln" not in shown
    assert f"training loss per step: {tmp_path / 'loss_curve.png'}" in shown and "h.0.ln_1" in shown


def test_front_matter_split():
    meta, body = split_front_matter(SOURCE_CARD)
    assert meta["license"] == "mit" and body.startswith("# The original card")
    assert split_front_matter("# plain\n") == ({}, "# plain\n")
