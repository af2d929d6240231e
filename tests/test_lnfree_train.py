"""remove-ln training machinery: data sources, resume equality, NaN stop, spike back-off, two processes,
and the CLI end to end (calibrate-only and a short fine-tune)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lnfree_helpers import removal_setup, tiny_config, tiny_data
from normsurgeon.errors import InputError
from normsurgeon.train.data import ByteTokenizer, load_token_data
from normsurgeon.train.loop import TrainHooks, TrainingDiverged, train

HERE = Path(__file__).parent


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_data_sources(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "a.txt").write_text("hello world " * 50)
    d = load_token_data(str(tmp_path / "a.txt"), tok)
    assert d.train.numel() + d.heldout.numel() == 600 and d.heldout.numel() == 30
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.txt").write_text(f"doc {i}\n")
    (folder / "blob.bin").write_bytes(b"\0\1\2")
    d = load_token_data(str(folder), tok)
    assert bytes(d.heldout.tolist()) == b"doc 19\ndoc 39\n"
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(3)))
    d = load_token_data(str(tmp_path / "x.jsonl"), tok, text_field="body")
    assert bytes(torch.cat([d.train, d.heldout]).tolist()) == b"row 0row 1row 2"
    with pytest.raises(InputError, match="field"):
        load_token_data(str(tmp_path / "x.jsonl"), tok)
    saved = tmp_path / "ds"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="optional package `datasets`"):
            load_token_data(str(saved), tok)


def test_resume_gives_identical_weights(tmp_path):
    cfg = tiny_config()
    model, sites, hooks = removal_setup(dropout=0.1)  # dropout: the random state must resume too
    full = train(model, tiny_data(), cfg, hooks=hooks)
    assert sites.all_fake() and full.steps_done == 8
    want = _state(model)

    model, sites, hooks = removal_setup(dropout=0.1)
    part = train(model, tiny_data(), cfg, hooks=hooks, checkpoint_dir=tmp_path, stop_after=3)
    assert part.stopped_at == 3 and (tmp_path / "step-000003.pt").is_file()
    model, sites, hooks = removal_setup(dropout=0.1)  # a fresh process: nothing carried over but the checkpoint
    res = train(model, tiny_data(), cfg, hooks=hooks, checkpoint_dir=tmp_path, resume=True)
    assert res.resumed_from == 3 and sites.all_fake()
    got = _state(model)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [h["loss"] for h in res.history] == [h["loss"] for h in full.history]


class _Poison(TrainHooks):
    """Returns a NaN (or a huge) loss at given steps."""

    def __init__(self, at: int, value: float, once: bool = False):
        self.at, self.value, self.once, self.fired, self.step = at, value, once, False, 0

    def on_step(self, step):
        self.step = step
        return []

    def loss(self, model, ids):
        total, ce = super().loss(model, ids)
        if self.step == self.at and not (self.once and self.fired):
            self.fired = True
            total = total * self.value
        return total, ce


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    from lnfree_helpers import tiny_model

    with pytest.raises(TrainingDiverged, match="step-000004.pt"):
        train(tiny_model(), tiny_data(), tiny_config(), hooks=_Poison(5, float("nan")), checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004.pt"]


def test_spike_backs_off():
    from lnfree_helpers import tiny_model

    cfg = tiny_config(spike_factor=3.0, spike_window=3, checkpoint_every=2, steps=8)
    res = train(tiny_model(), tiny_data(), cfg, hooks=_Poison(5, 100.0, once=True))
    assert res.backoffs == 1 and res.steps_done == 8
    assert [h["step"] for h in res.history] == list(range(8))
    assert res.history[-1]["lr"] < tiny_config().lr  # halved after the back-off


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", str(HERE / "lnfree_ddp_script.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = torch.load(out, weights_only=True)
    model, sites, hooks = removal_setup()
    train(model, tiny_data(), tiny_config(), hooks=hooks)
    single = model.state_dict()
    for k, v in single.items():
        assert torch.allclose(ddp[k].double(), v.double(), atol=1e-5, rtol=1e-4), k


def test_cli_end_to_end(tmp_path):
    from typer.testing import CliRunner

    import transformers as T
    from normsurgeon.cli import app
    from normsurgeon.io.loader import load_model

    from lnfree_helpers import tiny_model

    folder = tmp_path / "m"
    tiny_model().save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(tiny_data().train.tolist()))
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""normsurgeon: 1
name: test
target: remove-ln
schedule: {momentum: 0.9, stages: [{role: mlp, start: 1, gap: 1}, {role: attn_qk, start: 2},
                                   {role: attn_v, start: 3}, {role: final, start: 4}]}
train: {steps: 6, lr: 3.0e-3, warmup_steps: 1, batch_size: 4, block_size: 16, checkpoint_every: 3, eval_windows: 4}
calibration_batches: 2
""")
    res = CliRunner().invoke(app, ["remove-ln", str(folder), "-o", str(out), "--data", str(text), "--tokenizer", "bytes",
                                   "--finetune", "--control", "--recipe", str(recipe), "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "lnfree_report.json").read_text())
    L = report["losses"]
    assert L["before"] and L["removed_no_finetune"] and L["after"] and L["control"]
    assert (out / "loss_curve.png").is_file() and (out / "control" / "config.json").is_file()
    stock = T.GPT2LMHeadModel.from_pretrained(out).eval()  # stock transformers, no remote code
    assert stock.config.layer_norm_epsilon == 1e12
    native = load_model(str(out / "native")).model
    with pytest.raises(Exception):
        T.AutoModelForCausalLM.from_pretrained(out / "native")  # custom model_type: refused loudly
    ids = tiny_data().heldout[:32].view(2, 16)
    with torch.no_grad():
        a, b = stock(input_ids=ids).logits.log_softmax(-1), native(input_ids=ids).logits.log_softmax(-1)
    assert (a - b).abs().max() < 1e-4
    assert report["export"]["native"]["float64_vs_fake"] < 1e-10
