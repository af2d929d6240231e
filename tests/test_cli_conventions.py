"""Issue 12, items 6 and 7 and the CLI side of 1: the command line's conventions.

``-h`` everywhere; help examples never wrapped mid-path at any width (and still valid invocations); the
command list's one-liners are whole sentences; choices and defaults shown; dtype aliases; one name per idea
(deprecated spellings hidden but accepted); ``--device``; ``-q`` / ``-v``; the library options wired in
(``--max-logprob-delta``, ``--keep-checkpoints``); reports rendered instead of raw Markdown.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import typer

from faults import cli
from normsurgeon.cli import app
from normsurgeon.cli.options import canonical_dtype

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-gpt2"
TINY = "normsurgeon.testing:tiny_gpt2"
TEXT = "DEF F(X):\n    RETURN X + 1\nA = (B, 2)  # C\n" * 200  # bytes < 96 (the tiny models' vocabulary)
TEXT_FLAGS = ["--tokenizer", "bytes", "--seq-len", "16", "--batch-size", "2"]
WIDTHS = (40, 80, 200)


def _root():
    return typer.main.get_command(app)


COMMANDS = sorted(_root().commands)


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(TEXT)
    return p


def _help(capfd, monkeypatch, width: int, *argv) -> str:
    monkeypatch.setenv("COLUMNS", str(width))
    code, out, err = cli(capfd, *argv, "-h")
    assert code == 0 and not err, err
    return out


def _example_lines(name: str) -> list[str]:
    doc = _root().commands[name].callback.__doc__ or ""
    assert "\b\n        Example:" in doc, f"{name}: its help has no unwrapped (\\b) Example block"
    block = doc.split("Example:", 1)[1]
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


# -- -h, examples, one-liners -----------------------------------------------------------------------------
@pytest.mark.parametrize("width", WIDTHS)
def test_h_everywhere_and_examples_never_wrapped(capfd, monkeypatch, width):
    assert "Commands:" in _help(capfd, monkeypatch, width)
    for name in COMMANDS:
        text = _help(capfd, monkeypatch, width, name)
        shown = {ln.strip() for ln in text.splitlines()}
        for line in _example_lines(name):
            assert line in shown, f"{name} -h at COLUMNS={width} breaks the example line {line!r}:\n{text}"


def test_help_examples_are_valid_invocations():
    root = _root()
    for name in COMMANDS:
        argv = shlex.split(" ".join(ln.rstrip("\\").strip() for ln in _example_lines(name)))
        assert argv[:2] == ["normsurgeon", name], argv
        root.commands[name].make_context(name, argv[2:])  # every option of the example exists and parses


@pytest.mark.parametrize("width", WIDTHS)
def test_command_list_one_liners_are_whole_sentences(capfd, monkeypatch, width):
    text = _help(capfd, monkeypatch, width)
    section = text.split("Commands:", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    last = None
    for line in section.splitlines():
        m = re.match(r"^  (\S+)\s+(.*)$", line)
        if m and m.group(1) in COMMANDS:
            last = m.group(1)
            entries[last] = m.group(2)
        elif line.strip() and last:
            entries[last] += " " + line.strip()
    assert sorted(entries) == COMMANDS, section
    for name, sentence in entries.items():
        assert sentence[0].isupper() and sentence.endswith(".") and "..." not in sentence and "…" not in sentence, \
            (name, sentence)


def test_choices_and_defaults_are_shown(capfd, monkeypatch):
    convert = _help(capfd, monkeypatch, 200, "convert")
    assert re.search(r"(?s)--to \[rmsnorm\|crmsnorm\]\s.{0,200}?\[default: rmsnorm\]", convert)
    assert "--dtype [source|float64|float32|bfloat16|float16]" in convert and "bf16" in convert
    assert "--verify-mode [auto|whole|layerwise]" in convert and "<str>" not in convert.split("--to")[1].split("\n")[0]
    assert "--qk-norm [keep|on|off|qkv]" in _help(capfd, monkeypatch, 200, "place")
    assert "--to [fixed|dyt]" in _help(capfd, monkeypatch, 200, "remove-ln")
    root = _root()
    for name, cmd in root.commands.items():  # every visible option with a default shows it
        ctx = cmd.make_context(name, [], resilient_parsing=True)
        for p in cmd.params:
            if p.param_type_name != "option" or p.hidden or p.default in (None, False) or getattr(p, "is_flag", False) \
                    and not p.secondary_opts:
                continue
            record = p.get_help_record(ctx)
            assert record and "default:" in record[1], (name, p.opts, record)


def test_place_scheme_choices_match_the_library():
    from normsurgeon.cli.place import _SCHEMES
    from normsurgeon.placement.spec import SCHEMES

    assert list(_SCHEMES) == list(SCHEMES)


def test_place_data_help_names_the_builtin_text(capfd, monkeypatch):
    assert "built-in calibration text" in " ".join(_help(capfd, monkeypatch, 200, "place").split())


# -- dtype aliases, one name per idea -----------------------------------------------------------------------
def test_dtype_aliases():
    assert [canonical_dtype(a) for a in ("fp16", "bf16", "fp32", "fp64", "auto", "BF16", "float16")] == \
        ["float16", "bfloat16", "float32", "float64", "source", "bfloat16", "float16"]
    with pytest.raises(ValueError):
        canonical_dtype("fp8")


def test_dtype_aliases_on_the_command_line(capfd):
    for alias, name in (("bf16", "bfloat16"), ("fp64", "float64"), ("auto", "float32")):
        code, out, _ = cli(capfd, "plan", EXAMPLE, "--dtype", alias, "--json")
        assert code == 0 and json.loads(out)["output_dtype"] == name, (alias, out[:200])
    code, out, err = cli(capfd, "convert", EXAMPLE, "-o", "never", "--dtype", "fp8")
    assert code == 2 and "unknown dtype 'fp8'" in err and len(err.strip().splitlines()) == 1, err


CANONICAL = {"--num-seqs", "--seq-len", "--micro-batch-size", "--overwrite", "--json", "--device", "--progress"}
DEPRECATED = {"--num": "--num-seqs", "--micro-batch": "--micro-batch-size", "--block-size": "--seq-len"}


def test_one_name_per_idea():
    """An inventory of every visible option: deprecated spellings are hidden everywhere, and an option that
    several commands share has one spelling."""
    visible: dict[str, set[str]] = {}
    for name, cmd in _root().commands.items():
        for p in cmd.params:
            if p.param_type_name != "option":
                continue
            for opt in p.opts + p.secondary_opts:
                if p.hidden:
                    assert opt in DEPRECATED or opt == "--stop-after", (name, opt)
                else:
                    visible.setdefault(opt, set()).add(name)
    assert not set(DEPRECATED) & set(visible), set(DEPRECATED) & set(visible)
    assert CANONICAL <= set(visible)
    assert visible["--seq-len"] >= {"verify", "diagnose", "place", "remove-ln", "prepbn"}
    assert visible["--micro-batch-size"] >= {"diagnose", "remove-ln", "prepbn"}
    assert visible["-q"] == visible["-v"] == set(COMMANDS)
    assert visible["--json"] == set(COMMANDS)


def test_deprecated_spellings_still_work(capfd, tmp_path, text_file):
    out = tmp_path / "rms"
    assert cli(capfd, "convert", EXAMPLE, "-o", out, "--json")[0] == 0
    for flag in ("--num", "--num-seqs"):
        code, stdout, err = cli(capfd, "verify", EXAMPLE, out, flag, "2", "--json")
        assert code == 0 and json.loads(stdout)["inputs"]["description"].startswith("built-in (seed 0): 2x64"), stdout
        assert ("deprecated" in err) == (flag == "--num"), err
    code, stdout, _ = cli(capfd, "diagnose", TINY, "--data", text_file, "--tokenizer", "bytes", "--num-seqs", "2",
                          "--seq-len", "16", "--micro-batch", "1", "--no-removal", "--no-grads", "--json")
    assert code == 0 and json.loads(stdout)["settings"]["micro_batch"] == 1
    code, stdout, _ = cli(capfd, "remove-ln", TINY, "--data", text_file, "--tokenizer", "bytes", "--block-size", "12",
                          "--batch-size", "2", "-o", tmp_path / "ln", "--json")
    assert code == 0 and json.loads(stdout)["recipe"]["train"]["block_size"] == 12


# -- --device, -q / -v --------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("cmd", ["remove-ln", "prepbn"])
def test_cuda_without_cuda_is_a_one_line_usage_error(capfd, tmp_path, cmd, text_file):
    for dev in ("cuda", "cuda:1"):
        code, out, err = cli(capfd, cmd, TINY, "--data", text_file, "-o", tmp_path / "o", "--device", dev)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "CUDA is not available" in lines[0], err
        assert not (tmp_path / "o").exists()
    code, out, err = cli(capfd, cmd, TINY, "--data", text_file, "-o", tmp_path / "o", "--device", "gpu", "--json")
    assert code == 2 and json.loads(out)["schema"] == "normsurgeon.error/1" and "not a device" in err


def test_device_cpu_trains_on_the_cpu(capfd, tmp_path, text_file):
    code, out, err = cli(capfd, "remove-ln", TINY, "--data", text_file, *TEXT_FLAGS, "--finetune", "--steps", "2",
                         "-o", tmp_path / "o", "--device", "cpu", "-v")
    assert code == 0, err
    assert "device=cpu" in err  # -v: the resolved options


def test_accelerate_device_sets_and_restores_the_environment(monkeypatch):
    import os

    from normsurgeon.cli.device import accelerate_device

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with accelerate_device("cpu"):
        assert os.environ["ACCELERATE_USE_CPU"] == "1"
        from normsurgeon.train.loop import make_accelerator

        assert make_accelerator().device.type == "cpu"
    assert "ACCELERATE_USE_CPU" not in os.environ


def test_quiet_and_verbose(capfd, tmp_path):
    code, out, err = cli(capfd, "convert", EXAMPLE, "-o", tmp_path / "a")
    assert code == 0 and "· " in err  # status lines by default
    code, out, err = cli(capfd, "convert", EXAMPLE, "-o", tmp_path / "b", "-q")
    assert code == 0 and err.strip() == "" and "wrote" in out
    code, out, err = cli(capfd, "-q", "convert", EXAMPLE, "-o", tmp_path / "c")  # global, before the command
    assert code == 0 and err.strip() == ""
    code, out, err = cli(capfd, "convert", EXAMPLE, "-o", tmp_path / "d", "-v")
    assert code == 0 and "debug: normsurgeon" in err and "debug: options:" in err and re.search(r"· \[\s*\d+\.\ds\]", err)
    code, out, err = cli(capfd, "convert", EXAMPLE, "-o", tmp_path / "e")  # the next run is back to normal
    assert code == 0 and "debug:" not in err and "· " in err
    code, out, err = cli(capfd, "-v", "convert", EXAMPLE, "-o", tmp_path / "f", "-q")
    assert code == 2 and "exclude each other" in err


# -- library options wired in, reports rendered ----------------------------------------------------------------
def test_max_logprob_delta_is_recorded(capfd, tmp_path):
    code, out, _ = cli(capfd, "convert", EXAMPLE, "-o", tmp_path / "rms", "--max-logprob-delta", "0.5", "--json")
    assert code == 0 and json.loads(out)["explicit_threshold"] == {"max_abs_logprob": 0.5}
    assert json.loads(out)["metrics"]["max_abs_logprob"]["threshold"] == 0.5
    code, out, _ = cli(capfd, "verify", EXAMPLE, tmp_path / "rms", "--max-logprob-delta", "1e-3", "--json")
    assert code == 0 and json.loads(out)["explicit_threshold"] == {"max_abs_logprob": 1e-3}
    code, out, _ = cli(capfd, "convert", EXAMPLE, "-o", tmp_path / "s", "--stream", "--verify-mode", "whole",
                       "--max-logprob-delta", "0.5", "--json")  # streamed, verified whole: applied too
    assert code == 0 and json.loads(out)["explicit_threshold"] == {"max_abs_logprob": 0.5}
    code, _, err = cli(capfd, "convert", EXAMPLE, "-o", tmp_path / "lw", "--stream", "--verify-mode", "layerwise",
                       "--max-logprob-delta", "0.5")
    assert code == 2 and "layer by layer" in err and not (tmp_path / "lw").exists()
    code, _, err = cli(capfd, "convert", EXAMPLE, "-o", tmp_path / "n", "--max-logprob-delta", "-1")
    assert code == 2


def _no_raw_markdown(text: str) -> None:
    assert "![" not in text and "| ---" not in text and "|---" not in text, text
    assert not re.search(r"^#{1,3} ", text, re.M), text


def test_keep_checkpoints_and_rendered_reports(capfd, tmp_path, text_file):
    ft = ["--finetune", "--steps", "2", "--checkpoint-every", "1"]
    code, out, err = cli(capfd, "remove-ln", TINY, "--data", text_file, *TEXT_FLAGS, *ft, "-o", tmp_path / "a")
    assert code == 0 and not (tmp_path / "a.checkpoints").exists(), err
    _no_raw_markdown(out)
    assert f"{tmp_path / 'a' / 'loss_curve.png'}" in out.replace("\n", "")  # the image named, not drawn
    code, out, err = cli(capfd, "remove-ln", TINY, "--data", text_file, *TEXT_FLAGS, *ft, "-o", tmp_path / "b",
                         "--keep-checkpoints")
    assert code == 0 and any((tmp_path / "b.checkpoints" / "removal").glob("step-*.pt")), err
    code, out, err = cli(capfd, "prepbn", TINY, "--data", text_file, *TEXT_FLAGS, *ft, "--recalib-batches", "2",
                         "-o", tmp_path / "c", "--keep-checkpoints")
    assert code == 0 and any((tmp_path / "c.checkpoints" / "prepbn").glob("step-*.pt")), err
    _no_raw_markdown(out)
    code, out, err = cli(capfd, "prepbn", TINY, "--data", text_file, *TEXT_FLAGS, *ft, "--recalib-batches", "2",
                         "-o", tmp_path / "d")
    assert code == 0 and not (tmp_path / "d.checkpoints").exists()
    for extra in (["-o", tmp_path / "e"], ["--dry-run"]):
        code, out, err = cli(capfd, "place", EXAMPLE, "--scheme", "lns", "--calib-seqs", "2", "--eval-seqs", "2",
                             "--seq-len", "32", *extra)
        assert code == 0, err
        _no_raw_markdown(out)
