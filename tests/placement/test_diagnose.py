"""``diagnose``: metrics against direct computation, spike scores, and the report on the shipped example."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from placement_helpers import gpt2, ids, llama
from normsurgeon.cli import app
from normsurgeon.diagnose.compute import _ce_sum, diagnose_model
from normsurgeon.diagnose.spikes import log_spikes

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-gpt2"


@pytest.mark.parametrize("factory", [llama, gpt2])
def test_removal_and_gradients_match_direct_computation(factory):
    m = factory(layers=3).eval()
    x = ids(3, 12)
    d = diagnose_model(m, x, micro_batch=2)
    blocks = m.model.layers if factory is llama else m.transformer.h
    n = 3 * 11
    with torch.no_grad():
        base = float(_ce_sum(m, x)) / n
        assert d.loss == pytest.approx(base, rel=1e-9)
        for k in range(3):
            blocks[k].forward = lambda h, *a, **kw: h
            dropped = float(_ce_sum(m, x)) / n
            del blocks[k].forward
            assert d.layers[k]["removal_delta_loss"] == pytest.approx(dropped - base, abs=1e-9)
    (_ce_sum(m, x) / n).backward()
    g = sum(float(p.grad.pow(2).sum()) for p in blocks[1].parameters()) ** 0.5
    assert d.layers[1]["grad_norm_block"] == pytest.approx(g, rel=1e-9)
    assert all(p.requires_grad for p in m.parameters())  # flags restored
    assert d.angular[0][0] < 1e-6 and len(d.angular) == 4


def test_raw_block_outputs_not_final_normed_hidden_states():
    m = gpt2(layers=2).eval()
    x = ids(2, 8)
    d = diagnose_model(m, x, grads=False, removal=False)
    with torch.no_grad():
        hs = m(input_ids=x, output_hidden_states=True).hidden_states
    raw = m.transformer.h[1](hs[1])  # the last block's raw output
    assert d.layers[-1]["second_moment"] == pytest.approx(float(raw.double().pow(2).mean()), rel=1e-6)
    assert d.layers[-1]["second_moment"] != pytest.approx(float(hs[-1].double().pow(2).mean()), rel=1e-3)


def test_spike_score_reads_train_history(tmp_path):
    hist = [{"step": i, "loss": 2.0 + 0.01 * (i % 3), "grad_norm": 1.0} for i in range(60)]
    hist[40]["loss"] = 9.0
    log = tmp_path / "log.json"
    log.write_text(json.dumps({"history": hist}))
    s = log_spikes(log)
    assert s["loss"]["spikes"] == [40] and s["grad_norm"]["spikes"] == []
    (tmp_path / "plain.txt").write_text("\n".join(str(h["loss"]) for h in hist))
    assert log_spikes(tmp_path / "plain.txt")["loss"]["spikes"] == [40]


def test_cli_diagnose_writes_report_with_plots_for_the_example(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"loss": 3.0 - i * 0.01}) for i in range(30)))
    out = tmp_path / "diag"
    res = CliRunner().invoke(app, ["diagnose", str(EXAMPLE), "--data", "examples.stdlib_corpus:load_stdlib_corpus",
                                   "--num-seqs", "2", "--seq-len", "64", "--log", str(log), "-o", str(out)])
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "report.html", "activations.png", "gradients.png", "angular.png",
            "removal.png", "spikes.png"} <= names
    r = json.loads((out / "report.json").read_text())
    assert r["num_layers"] == 4 and len(r["angular"]) == 5 and "removal_delta_loss" in r["layers"][0]
    assert "At a glance" in (out / "report.md").read_text()
    bad = CliRunner().invoke(app, ["diagnose", str(EXAMPLE), "--data", str(tmp_path / "missing.txt")])
    assert bad.exit_code == 5
