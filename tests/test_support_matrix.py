"""Issue 10's support matrix, CI-sized: `convert` (float32 and float64) and `inspect` on every zoo architecture,
in-process through ``normsurgeon.cli.main``, and docs/support.md checked against a fresh run.

What holds today is asserted for every entry: a documented exit code, and on failure exactly one short error
line, no traceback, nothing written. The issue's targets (no exit 1; an exact conversion where the structure
allows it; a clean refusal where it does not) are asserted too, and the entries that miss them today are
``xfail(strict=True)`` with the cause: a fix turns the xfail into a failure, and whoever fixed it removes the
entry from ``CONVERT_TODAY`` / ``CONVERT_TODAY_F64`` / ``INSPECT_TODAY`` (and regenerates docs/support.md with
``python benchmarks/support_matrix.py``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

from model_zoo import KINDS, RECIPES, ZOO, build_zoo, example_inputs
from normsurgeon import cli

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("support_matrix", ROOT / "benchmarks" / "support_matrix.py")
sm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm)

DOCUMENTED_EXITS = {0, 1, 2, 3, 4, 5, 6, 7}
MAX_ERROR_CHARS = 330  # issue 10: "at most about 300 characters"

# Today's misses of the convert targets, with the cause: float32 and float64 alike ...
CONVERT_TODAY = {
    "xglm": "refused: the sinusoidal position table is a buffer indexed at run time ('the residual stream cannot "
            "be followed: it adds `index_select` of `model.embed_positions.weights`')",
    "whisper": "partial: only the decoder stream is converted; the encoder's 5 LayerNorms are left as they were",
    "videomae": "refused: 'the residual stream cannot be followed: it adds `type_as` in `videomae.embeddings`' "
                "(the fixed sinusoidal position table)",
}
# ... and float64 only.
CONVERT_TODAY_F64 = {
    "cohere": "exit 3: float64 verification catches 5.5e-08 > 1e-10 (CohereLayerNorm computes in float32 "
              "whatever the model dtype; float32 passes)",
    "olmo": "exit 3: float64 verification catches 4.6e-07 > 1e-10 (parameter-free LayerNorm; float32 passes)",
    "gemma": "exit 3: float64 verification catches 5.8e-08 > 1e-10 (GemmaRMSNorm computes in float32 whatever "
             "the model dtype; float32 passes)",
}
# Today's exit 1 of `inspect`.
INSPECT_TODAY: dict[str, str] = {}
DTYPES = ("float32", "float64")


def _xfail_if(reason: str | None, only_exit1: bool = False):
    if reason is None or (only_exit1 and not reason.startswith("exit 1")):
        return []
    return [pytest.mark.xfail(strict=True, reason=reason)]


def _convert_params(known: bool, only_exit1: bool = False):
    """(name, dtype) for every zoo entry; with ``known``, today's misses marked xfail(strict)."""
    out = []
    for n in ZOO:
        for d in DTYPES:
            reason = (CONVERT_TODAY.get(n) or (CONVERT_TODAY_F64.get(n) if d == "float64" else None)) if known \
                else None
            out.append(pytest.param(n, d, marks=_xfail_if(reason, only_exit1), id=f"{n}-{d}"))
    return out


# ------------------------------------------------------------------------------------------------ running
_FOLDERS: dict = {}
_RUNS: dict = {}


def _folder(name: str, dtype: str, tmp_path_factory) -> tuple[Path, dict]:
    key = (name, dtype)
    if key not in _FOLDERS:
        folder = tmp_path_factory.mktemp(f"zoo-{name}-{dtype}")
        model = build_zoo(name)
        prep = {"layer_norms": sm.layer_norm_names(model)}
        model.to(getattr(torch, dtype)).save_pretrained(folder / "model")
        _FOLDERS[key] = folder, prep
    return _FOLDERS[key]


def _run(recipe: str, name: str, dtype: str, capfd, tmp_path_factory) -> dict:
    """One in-process CLI run (cached for the session): exit code, stdout, stderr, output folder, cell."""
    key = (recipe, name, dtype)
    if key not in _RUNS:
        folder, prep = _folder(name, dtype, tmp_path_factory)
        out = folder / f"out-{recipe}"
        args = ["inspect", str(folder / "model"), "--json"] if recipe == "inspect" else \
            ["convert", str(folder / "model"), "--to", "rmsnorm", "-o", str(out), "--json"]
        debug = os.environ.pop("NORMSURGEON_DEBUG", None)
        capfd.readouterr()
        try:
            rc = cli.main(args)
        except SystemExit as e:  # pragma: no cover - main returns its exit code
            rc = e.code
        finally:
            if debug is not None:
                os.environ["NORMSURGEON_DEBUG"] = debug
        stdout, stderr = capfd.readouterr()
        res = sm.classify(recipe, rc, stdout, stderr, out if out.exists() else None, prep)
        res.update(stdout=stdout, stderr=stderr, out=out)
        _RUNS[key] = res
    return _RUNS[key]


# ------------------------------------------------------------------------------------------------ the zoo
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_entry_is_tiny_randomised_and_runs(name):
    entry = ZOO[name]
    assert entry.kind in KINDS and set(entry.recipes) <= set(RECIPES) and "convert" in entry.recipes
    model = build_zoo(name)
    assert sum(p.numel() for p in model.parameters()) < 300_000
    with torch.no_grad():
        model(**example_inputs(model))
    # Randomised: no norm keeps its default gain 1 / shift 0, no BatchNorm its default statistics.
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            assert not torch.all(mod.running_var == 1), mname
        if isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None:
            assert not torch.all(mod.weight == 1), mname


def test_zoo_covers_issue_10():
    kinds = {k: [n for n, e in ZOO.items() if e.kind == k] for k in KINDS}
    assert all(kinds.values()), kinds
    assert len(kinds["decoder"]) >= 20
    required = {"gptj", "gpt_neox", "falcon", "phi", "mixtral", "phimoe", "dbrx", "qwen2_moe", "olmoe", "nemotron",
                "gemma", "olmo", "cohere", "xglm", "mpt", "codegen", "biogpt", "stablelm", "persimmon", "llama",
                "mistral", "qwen2", "whisper", "mbart", "pegasus", "marian", "t5", "m2m_100", "bart", "bert",
                "roberta", "xlm_roberta_xl", "esm", "megatron_bert", "vit", "deit", "beit", "dinov2",
                "siglip_vision", "data2vec_vision", "videomae", "wav2vec2_stable", "hubert", "wav2vec2_conformer",
                "resnet", "regnet", "mobilenet_v1", "mobilenet_v2", "convnext", "rt_detr_resnet", "dpt_hybrid"}
    assert required <= set(ZOO), required - set(ZOO)
    named = {n for n, e in ZOO.items() if e.named}
    assert {"whisper", "mbart", "beit", "dinov2", "olmo", "nemotron", "esm", "siglip_vision", "megatron_bert",
            "dbrx", "cohere"} <= named
    assert set(CONVERT_TODAY) | set(CONVERT_TODAY_F64) | set(INSPECT_TODAY) <= set(ZOO)


# ------------------------------------------------------------------------------------------------ convert
def _assert_clean(res: dict) -> None:
    assert res["rc"] in DOCUMENTED_EXITS, res["rc"]
    assert "Traceback" not in res["stderr"], res["stderr"][-2000:]
    if res["rc"] != 0:
        assert res["error_lines"] == 1, res["stderr"][-2000:]
        assert res["error_chars"] <= MAX_ERROR_CHARS, res["error"]


@pytest.mark.parametrize("name,dtype", _convert_params(known=False))
def test_convert_exits_with_a_documented_code_and_one_line(name, dtype, capfd, tmp_path_factory):
    res = _run("convert", name, dtype, capfd, tmp_path_factory)
    _assert_clean(res)
    if res["rc"] == 0:
        report = json.loads((res["out"] / "equivalence_report.json").read_text())
        assert report["status"] == "pass"
        assert report["metrics"]["max_abs_logprob"]["value"] <= report["metrics"]["max_abs_logprob"]["threshold"]
    else:
        assert not res["out"].exists(), "a failed convert wrote its output"
        assert json.loads(res["stdout"])["exit_code"] == res["rc"]  # --json: the error object on stdout


@pytest.mark.parametrize("name,dtype", _convert_params(known=True, only_exit1=True))
def test_convert_has_no_internal_error(name, dtype, capfd, tmp_path_factory):
    res = _run("convert", name, dtype, capfd, tmp_path_factory)
    assert res["rc"] != 1, res["error"]


@pytest.mark.parametrize("name,dtype", _convert_params(known=True))
def test_convert_meets_the_issue_10_target(name, dtype, capfd, tmp_path_factory):
    """exact: converts and verifies, every LayerNorm on the stream converted (gains kept on a norm allowed;
    an embedding LayerNorm may stay: mBART's, after the positions, cannot become an RMSNorm);
    refuse: exit 4; either: converts or refuses, nothing else."""
    entry = ZOO[name]
    res = _run("convert", name, dtype, capfd, tmp_path_factory)
    if entry.convert == "exact":
        left = [n for n in res.get("left_as_is") or () if "embedding" not in n]
        assert res["rc"] == 0 and res["cls"] in ("exact", "kept", "partial") and not left, \
            (res["cls"], res.get("error"), left)
    elif entry.convert == "refuse":
        assert res["rc"] == 4, (res["cls"], res.get("error"))
    else:
        assert res["rc"] in (0, 4) and res["cls"] in ("exact", "kept", "refused"), (res["cls"], res.get("error"))


# ------------------------------------------------------------------------------------------------ inspect
@pytest.mark.parametrize("name", [pytest.param(n, marks=_xfail_if(INSPECT_TODAY.get(n))) for n in ZOO])
def test_inspect_runs_on_every_architecture(name, capfd, tmp_path_factory):
    res = _run("inspect", name, "float32", capfd, tmp_path_factory)
    _assert_clean(res)
    assert res["rc"] == 0, res["error"]
    assert "norms" in json.loads(res["stdout"])


# ------------------------------------------------------------------------------------------------ the doc
def _doc_cells() -> dict:
    """(architecture, recipe) -> cell text of docs/support.md's tables (footnote links removed)."""
    cells, cols = {}, None
    for line in sm.DOC.read_text().splitlines():
        if line.startswith("| architecture |"):
            cols = [c.strip() for c in line.strip("|").split("|")]
        elif cols and line.startswith("| `"):
            vals = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            name = vals[0].strip("`")
            for col, val in zip(cols[2:], vals[2:]):
                cells[(name, col)] = re.sub(r"\s*\[\d+\]\(#r\d+\)$", "", val).replace("\\|", "|")
        elif not line.startswith("|"):
            cols = None if line.startswith("#") else cols
    return cells


def test_doc_is_generated_and_lists_every_zoo_architecture():
    text = sm.DOC.read_text()
    assert text.startswith(sm.GENERATED_MARK)
    assert f"Generated by `{sm.REGENERATE}`" in text
    cells = _doc_cells()
    missing = [n for n in ZOO if not any(k[0] == n for k in cells)]
    assert not missing, f"docs/support.md lacks {missing}: rerun {sm.REGENERATE}"
    for name, entry in ZOO.items():
        for recipe in entry.recipes:
            assert (name, recipe) in cells, (name, recipe)


@pytest.mark.parametrize("name", ["gpt2", "phi", "llama", "bert", "vit", "resnet"])
def test_doc_matches_a_fresh_run(name, capfd, tmp_path_factory):
    """The convert cells of a few fast architectures, run now, read as in docs/support.md: the doc cannot go
    stale silently (a fix or a regression that changes them needs `python benchmarks/support_matrix.py`)."""
    res = _run("convert", name, "float32", capfd, tmp_path_factory)
    doc = _doc_cells()
    assert doc.get((name, "convert")) == res["cell"], \
        f"docs/support.md says {doc.get((name, 'convert'))!r}, a fresh run {res['cell']!r}: rerun {sm.REGENERATE}"
