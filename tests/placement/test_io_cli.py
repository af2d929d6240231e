"""Writing and loading placed models (stock classes where they exist), and the CLI contract."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as T
from typer.testing import CliRunner

from placement_helpers import ids, llama
from normsurgeon.cli import app
from normsurgeon.placement.io import is_placed_folder, load_placed
from normsurgeon.placement.run import run_place

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-gpt2"
TEXT = "1 = 2 + 3\n(4, 5) * 6 - 7 / 8\n" * 200  # bytes < 64: fits the tiny vocabularies


def _llama_folder(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "llama"
    llama(dtype=torch.float32).save_pretrained(src)
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    return src, data


def _kw():
    return dict(tokenizer="bytes", calib_sequences=2, eval_sequences=2, seq_len=16)


def test_peri_exports_as_stock_hyperclovax(tmp_path):
    src, data = _llama_folder(tmp_path)
    r = run_place(str(src), tmp_path / "peri", scheme="peri", data=str(data), **_kw())
    assert r["output"]["stock"] and r["output"]["class"] == "HyperCLOVAXForCausalLM"
    stock = T.HyperCLOVAXForCausalLM.from_pretrained(tmp_path / "peri").eval()
    x = ids(2, 8)
    torch.testing.assert_close(stock(input_ids=x).logits, r["model_object"](input_ids=x).logits, rtol=1e-4, atol=1e-5)


def test_qk_norm_exports_as_stock_qwen3(tmp_path):
    src, data = _llama_folder(tmp_path)
    r = run_place(str(src), tmp_path / "qk", scheme="qk-norm", data=str(data), **_kw())
    assert r["output"]["class"] == "Qwen3ForCausalLM" and r["evaluation"]["delta_loss"] == r["evaluation"]["delta_loss"]
    assert T.AutoConfig.from_pretrained(tmp_path / "qk").model_type == "qwen3"


def test_custom_structure_round_trips_and_refuses_stock_loading(tmp_path):
    src, data = _llama_folder(tmp_path)
    r = run_place(str(src), tmp_path / "mix", scheme="mix", options={"alpha": 0.5}, data=str(data), **_kw())
    assert not r["output"]["stock"] and is_placed_folder(tmp_path / "mix")
    back = load_placed(tmp_path / "mix").model
    x = ids(2, 8)
    torch.testing.assert_close(back(input_ids=x).logits, r["model_object"](input_ids=x).logits)
    cfg = json.loads((tmp_path / "mix" / "config.json").read_text())
    assert cfg["model_type"].startswith("normsurgeon_") and (tmp_path / "mix" / "README.md").is_file()


def test_from_config_writes_fresh_model(tmp_path):
    src, _ = _llama_folder(tmp_path)
    r = run_place(str(src / "config.json"), tmp_path / "dn", scheme="deepnorm", from_config=True)
    assert r["evaluation"] is None and r["mode"] == "fresh"
    assert load_placed(tmp_path / "dn").model.model.layers[0].ns_spec.attn.residual_alpha > 1


def test_cli_place_lns_on_the_example_and_errors(tmp_path):
    runner = CliRunner()
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    out = tmp_path / "lns"
    res = runner.invoke(app, ["place", str(EXAMPLE), "--scheme", "lns", "--data", str(data), "-o", str(out),
                              "--calib-seqs", "2", "--eval-seqs", "2", "--seq-len", "32", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["preservation"]["level"] == "exact" and abs(report["evaluation"]["delta_loss"]) < 1e-5
    bad = runner.invoke(app, ["place", str(EXAMPLE), "--scheme", "sideways", "--data", str(data), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown scheme" in bad.output
    fused = runner.invoke(app, ["place", str(EXAMPLE), "--scheme", "qk-norm", "--data", str(data), "-o", str(tmp_path / "y"),
                                "--calib-seqs", "2", "--eval-seqs", "2", "--seq-len", "32"])
    assert fused.exit_code == 0, fused.output  # q, k heads normalised at their channels of the fused c_attn
    assert is_placed_folder(tmp_path / "y") and load_placed(tmp_path / "y").model.transformer.h[0].attn.k_norm is not None
    twice = runner.invoke(app, ["place", str(tmp_path / "y"), "--scheme", "lns", "--data", str(data), "-o", str(tmp_path / "z")])
    assert twice.exit_code in (2, 4) and not (tmp_path / "z").exists()
    nodata = runner.invoke(app, ["place", str(EXAMPLE), "--scheme", "peri", "-o", str(tmp_path / "w"),
                                 "--calib-seqs", "2", "--eval-seqs", "2", "--seq-len", "32"])
    assert nodata.exit_code == 0, nodata.output  # like verify: the built-in sample text calibrates
    written = json.loads((tmp_path / "w" / "placement_report.json").read_text())
    assert written["data"]["source"].startswith("built-in sample text") and any("no --data" in n for n in written["notes"])
