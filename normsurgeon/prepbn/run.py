"""``run_prepbn``: LayerNorm -> PRepBN -> (fine-tune) -> recalibrate -> fold -> verify -> write + report.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "t.txt").write_text("DEF F(X):\\n    RETURN X + 1\\n" * 300)  # bytes < 96 (vocab)
>>> r = run_prepbn("normsurgeon.testing:tiny_gpt2", d / "out", PRepBNOptions(data=str(d / "t.txt"),
...                tokenizer="bytes", finetune=True, recalib_batches=2,
...                overrides={"steps": 4, "block_size": 16, "batch_size": 2, "eval_windows": 2}))
>>> r["status"], r["fold_check"]["float64"]["ok"], sorted(p.name for p in (d / "out").iterdir())[:3]
('pass', True, ['README.md', 'config.json', 'equivalence_report.json'])
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from normsurgeon.version import __version__
from normsurgeon.errors import InputError, NormSurgeonError, UnsupportedModel, UsageError, VerificationFailed
from normsurgeon.prepbn.convert import find_sites, install_prepbn
from normsurgeon.prepbn.export import FORMAT, load_prepbn, output_config
from normsurgeon.prepbn.fold import finish_blend, fold_sites, recalibrate
from normsurgeon.prepbn.schedule import BlendSchedule
from normsurgeon.train.options import TrainingRunOptions

SCHEMA = "normsurgeon.prepbn/1"
VISION, TEXT = "image-classification", "causal-lm"
# Per checkpoint dtype: max |logit difference| / max |logit| between the folded and the unfolded model.
REL_THRESHOLDS = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
VISION_DEFAULTS = {"steps": 300, "lr": 5e-4, "warmup_steps": 10, "weight_decay": 0.05, "batch_size": 64,
                   "checkpoint_every": 100, "max_backoffs": 0}


@dataclasses.dataclass
class PRepBNOptions(TrainingRunOptions):
    """Everything ``run_prepbn`` needs besides the model and the output folder (shared fields: ``TrainingRunOptions``)."""

    blend_warmup: int | None = None  # default 10 % of the steps
    blend_steps: int | None = None  # default 60 % of the steps
    r0: float = 1.0
    eta: float = 0.0  # initial RepBN eta
    recalib_batches: int = 20


def task_of(model: torch.nn.Module) -> str:
    if getattr(model, "config", None) is None:
        raise UnsupportedModel("prepbn needs a Hugging Face model (image classifier or causal LM); "
                               f"{type(model).__name__} has no config")
    if getattr(model, "main_input_name", None) == "pixel_values" and getattr(model.config, "num_labels", None):
        return VISION
    lm = getattr(model, "get_output_embeddings", lambda: None)()
    if getattr(model, "main_input_name", None) == "input_ids" and lm is not None \
            and not getattr(model.config, "is_encoder_decoder", False):
        return TEXT
    raise UnsupportedModel(f"prepbn fine-tunes image classifiers (pixel_values -> logits) and causal language "
                           f"models (input_ids -> next-token logits); {type(model).__name__} is neither")


def train_config(task: str, overrides: dict[str, Any]):
    from pydantic import ValidationError

    from normsurgeon.train.config import TrainConfig

    base = dict(VISION_DEFAULTS) if task == VISION else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**base)
    except ValidationError as e:
        err = e.errors()[0]
        raise UsageError(f"invalid training setting {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


@dataclasses.dataclass
class _Task:
    """What differs between image classifiers and language models."""

    kind: str
    metric: str  # "accuracy" | "loss"
    evaluate: Callable[[torch.nn.Module], dict]
    forward: Callable[[torch.nn.Module, Any], Any]
    recal_batches: list
    check_inputs: Any
    logits: Callable[[torch.nn.Module, Any], torch.Tensor]
    data: Any
    description: dict


def _vision_task(model, opts: PRepBNOptions, cfg, device) -> _Task:
    from normsurgeon.prepbn.data import check_against_model, classifier_logits, evaluate, load_image_data, step_indices

    data = load_image_data(opts.data, cfg.seed)
    check_against_model(data, model)
    n = min(opts.recalib_batches, max(1, math.ceil(len(data.y_train) / cfg.batch_size)))
    batches = [data.x_train[step_indices(data, i, cfg.batch_size, cfg.seed + 7)] for i in range(n)]

    def fwd(m, x):
        p = next(m.parameters())
        return classifier_logits(m, x.to(p.device, p.dtype))

    return _Task(VISION, "accuracy", lambda m: evaluate(m, data.x_test, data.y_test), fwd, batches,
                 data.x_test[:128], fwd, data, data.description)


def _text_task(src, opts: PRepBNOptions, cfg, device) -> _Task:
    from normsurgeon.train.data import check_fits, heldout_windows, load_token_data, tokenizer_for, train_batch
    from normsurgeon.train.evaluate import heldout_loss

    vocab = getattr(src.model.config, "vocab_size", None)
    tok = tokenizer_for(src.path, vocab, opts.tokenizer)
    try:
        data = load_token_data(opts.data, tok, opts.text_field)
    except NormSurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a factory returning images for a language model
        raise InputError(f"cannot read {opts.data} as text for a language model: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    check_fits(data, cfg.block_size, vocab, tok)
    windows = heldout_windows(data.heldout, cfg.eval_windows, cfg.block_size, cfg.eval_seed)
    batches = [train_batch(data, i, cfg.batch_size, cfg.block_size, cfg.seed + 7) for i in range(opts.recalib_batches)]
    unit = "nats/token" + (" (byte)" if tok.name == "bytes" else "")

    def fwd(m, ids):
        return m(input_ids=ids.to(next(m.parameters()).device)).logits

    return _Task(TEXT, "loss", lambda m: {"loss": heldout_loss(m, windows), "unit": unit,
                                          "windows": int(windows.shape[0])},
                 fwd, batches, windows[:4, :64], fwd, data, data.description)


def run_prepbn(model: str, out: str | Path, opts: PRepBNOptions, status: Callable[[str], None] = lambda s: None,
               progress: Callable[..., None] | None = None) -> dict:
    """Convert ``model``'s LayerNorms to folded PRepBN and write ``out``; returns the report. ``progress``:
    ``progress("fine-tune (LN -> RepBN)", step, steps, unit="step", loss=, stage=)`` per training step.

    Returns ``{"status": "interrupted", ...}`` (nothing written) when ``opts.stop_after`` stops training.
    """
    from normsurgeon.io.destination import claim_output
    from normsurgeon.train.loop import is_main_process

    t0 = time.perf_counter()
    out = Path(out)
    if opts.data is None:
        raise UsageError("--data is required: the BatchNorm statistics are calibrated (and the model fine-tuned) on it")
    if opts.recalib_batches < 1:
        raise UsageError("--recalib-batches must be at least 1")
    ckpt_root = Path(opts.checkpoint_dir) if opts.checkpoint_dir else Path(str(out) + ".checkpoints")
    # after success the checkpoints under ckpt_root/prepbn are removed unless opts.keep_checkpoints
    with claim_output(out, inputs=[model, opts.data, opts.tokenizer], overwrite=opts.overwrite or
                      opts.stop_after is not None, status=status, also=[("--checkpoint-dir", ckpt_root)],
                      lock=is_main_process()) as dest:
        return _run_prepbn(model, dest, opts, ckpt_root, status, t0, progress)


def _run_prepbn(model: str, dest, opts: PRepBNOptions, ckpt_root: Path, status: Callable[[str], None],
                t0: float, progress: Callable[..., None] | None = None) -> dict:
    from normsurgeon.io.loader import load_model
    from normsurgeon.train.checkpoint import latest_checkpoint
    from normsurgeon.train.loop import make_accelerator

    out = dest.path
    status("loading the model")
    src = load_model(model, allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code)
    task_kind = task_of(src.model)
    sites = find_sites(src.model)
    cfg = train_config(task_kind, opts.overrides)
    sched = BlendSchedule.for_training(cfg.steps, opts.blend_warmup, opts.blend_steps, opts.r0) if opts.finetune else None
    acc = make_accelerator()
    src.model.to(acc.device)
    status(f"loading data ({opts.data})")
    task = (_vision_task(src.model, opts, cfg, acc.device) if task_kind == VISION
            else _text_task(src, opts, cfg, acc.device))
    n_pre = sum(s.role == "pre" for s in sites)
    status(f"{len(sites)} norms -> PRepBN ({n_pre} pre, {len(sites) - n_pre} final); evaluating the source")
    before = task.evaluate(src.model)

    work = copy.deepcopy(src.model).requires_grad_(True)
    install_prepbn(work, sites, eta=opts.eta)
    result = None
    if opts.finetune:
        from normsurgeon.prepbn.finetune import BlendHooks, train_classifier
        from normsurgeon.train.loop import run_progress, train

        hooks = BlendHooks(work, sched)
        ckpt = ckpt_root / "prepbn"
        resume = opts.resume and latest_checkpoint(ckpt) is not None
        status(f"fine-tuning {cfg.steps} steps (LN warm-up {sched.warmup}, blend over {sched.steps}, "
               f"pure RepBN from step {sched.end})")
        kw = dict(hooks=hooks, checkpoint_dir=ckpt, resume=resume, progress=opts.progress,
                  stop_after=opts.stop_after, log=status, accelerator=acc,
                  on_progress=run_progress(progress, {"fine-tune (LN -> RepBN)": cfg.steps})["fine-tune (LN -> RepBN)"])
        result = (train_classifier(work, task.data, cfg, **kw) if task_kind == VISION else train(work, task.data, cfg, **kw))
        if result.stopped_at is not None:
            return {"status": "interrupted", "step": result.stopped_at, "checkpoint": result.checkpoint}
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return {"status": "ok", "rank": acc.process_index}
    work = acc.unwrap_model(work) if hasattr(acc, "unwrap_model") else work
    notes = []
    left = finish_blend(work)
    if opts.finetune and left > 0:
        notes.append(f"the blend weight was still {left:.3f} after the last step (back-offs delayed the schedule); "
                     "it was set to 0 without further fine-tuning")
    status(f"recalibrating BN statistics on {len(task.recal_batches)} batches")
    recalibrate(work, task.recal_batches, task.forward)
    after = task.evaluate(work)
    results = {"before": before, "repbn_no_finetune": after}
    if opts.finetune:
        probe = copy.deepcopy(src.model)
        install_prepbn(probe, sites, eta=opts.eta)
        recalibrate(probe, task.recal_batches, task.forward)
        results = {"before": before, "repbn_no_finetune": task.evaluate(probe), "after_finetune": after}
        del probe

    status("folding every RepBN into its readers (float64, cast once) and checking")
    out_dtype = src.dtype
    ref64 = copy.deepcopy(work).double().eval()
    folded64 = copy.deepcopy(ref64)
    info = fold_sites(folded64, sites)
    inputs = task.check_inputs
    checks = {"float64": fold_check(ref64, folded64, inputs, task.logits, "float64")}
    folded = copy.deepcopy(folded64).to(out_dtype).eval()
    dname = _dtype_name(out_dtype)
    if dname != "float64":
        checks[dname] = fold_check(work.eval(), folded, inputs, task.logits, dname)
    bad = {k: v for k, v in checks.items() if not v["ok"]}
    if bad:
        worst = ", ".join(f"{k}: {v['rel_to_scale']:.2e} > {v['threshold']:.0e}" for k, v in bad.items())
        raise VerificationFailed(f"the folded model differs from the unfolded RepBN model beyond tolerance "
                                 f"({worst}); nothing written")
    extra = {"schedule": dataclasses.asdict(sched) if sched else None, "eta": info.eta,
             "bn_eps": work.get_submodule(sites[0].name).repbn.bn.eps}
    config = output_config(src.config, folded, info.identity, info.created_bias, info.untied, dname, extra,
                           factory=src.ref if src.kind == "factory" and getattr(src.model, "config", None) is None else None)
    report = {
        "schema": SCHEMA, "status": "pass", "command": "prepbn", "task": task_kind, "metric": task.metric,
        "source": {"ref": src.ref, "architecture": type(src.model).__name__, "dtype": _dtype_name(src.dtype)},
        "output": {"path": str(out), "format": FORMAT, "dtype": dname, "loads_with": "normsurgeon.load only"},
        "results": results,
        "fold_check": checks,
        "norms": [{"name": s.name, "role": s.role, "family": s.family, "readers": [r for r, _ in s.readers],
                   "eta": info.eta[s.name], "scale_abs_min": info.scale_range[s.name][0],
                   "scale_abs_max": info.scale_range[s.name][1]} for s in sites],
        "fold": {"identity": info.identity, "created_bias": info.created_bias, "untied": info.untied},
        "method": {"finetune": opts.finetune, "schedule": extra["schedule"], "eta_init": opts.eta,
                   "recalibration_batches": len(task.recal_batches)},
        "train": _train_summary(result, cfg, task_kind),
        "data": task.description, "notes": notes,
        "tool": {"normsurgeon": __version__, "torch": torch.__version__},
    }
    from normsurgeon.io.writer import copy_tagalong_files, write_safetensors

    with dest.staging() as tmp:
        write_safetensors(folded.state_dict(), tmp, 5 * 10**9, {"normsurgeon": FORMAT})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        copy_tagalong_files(src.path, tmp)
        loaded = load_prepbn(tmp).to(acc.device)
        written = fold_check(folded, loaded, inputs, task.logits, dname)
        written["threshold"], written["ok"] = 0.0, written["max_abs_logit"] == 0.0
        checks["written"] = written
        if not written["ok"]:
            raise VerificationFailed(f"the written folder does not reload to the folded model (max |Δ| "
                                     f"{written['max_abs_logit']:.2e}); nothing written")
        report["results"]["after_fold"] = task.evaluate(loaded)
        report["change"] = _change(report["results"], task.metric)
        report["timing_s"] = round(time.perf_counter() - t0, 1)
        if result is not None and result.history:
            from normsurgeon.prepbn.report import curve_png

            curve_png(tmp / "loss_curve.png", result.history, sched)
            report["loss_curve"] = "loss_curve.png"  # paths in the report are relative to the output folder
        from normsurgeon.train.checkpoint import checkpoint_note

        report["checkpoints"] = checkpoint_note(ckpt_root, out, opts.keep_checkpoints,
                                                ["prepbn"] if opts.finetune else [])
        from normsurgeon.prepbn.report import write_report

        write_report(report, tmp)
        _write_card(tmp, report, src, task_kind)
    if opts.finetune and not opts.keep_checkpoints:
        from normsurgeon.train.checkpoint import discard_checkpoints

        discard_checkpoints(ckpt_root, ["prepbn"], whole=opts.checkpoint_dir is None)
    return report


def _write_card(tmp: Path, report: dict, src, task_kind: str) -> None:
    from normsurgeon.io.model_card import write_model_card

    m, f = report["method"], report["fold"]
    done = [f"every LayerNorm ({len(report['norms'])}) replaced by a progressive RepBN (SLAB)" +
            (f", fine-tuned {report['train'].get('steps_done', 0)} steps while the LayerNorm share decays to 0"
             if m["finetune"] else " without fine-tuning"),
            f"BatchNorm statistics recalibrated on {m['recalibration_batches']} training batches",
            "every RepBN folded into the layers that read it, in float64 and cast once: no normalization module "
            "remains" + (f"; biases created: {len(f['created_bias'])}" if f["created_bias"] else "")
            + (f"; untied from the embedding: {', '.join(f['untied'])}" if f["untied"] else "")]
    write_model_card(tmp, src.ref, src.path, "prepbn", report, False, done, output_path=report["output"]["path"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@torch.no_grad()
def fold_check(ref: torch.nn.Module, folded: torch.nn.Module, inputs, logits_fn, dtype: str) -> dict:
    """Max |logit difference|, relative to max |logit|, plus log-prob metrics, on ``inputs``."""
    from normsurgeon.verification.metrics import output_metrics

    a = logits_fn(ref.eval(), inputs).double()
    b = logits_fn(folded.eval(), inputs).double()
    max_abs = float((a - b).abs().max())
    scale = float(a.abs().max())
    rel = max_abs / scale if scale > 0 else max_abs
    m = output_metrics(a, b)
    th = REL_THRESHOLDS.get(dtype, REL_THRESHOLDS["float32"])
    return {"dtype": dtype, "max_abs_logit": max_abs, "logit_scale": scale, "rel_to_scale": rel,
            "max_abs_logprob": m["max_abs_logprob"], "top1_agreement": m["top1_agreement_all"],
            "positions": m["positions"], "threshold": th, "ok": rel <= th}


def _change(results: dict, metric: str) -> dict:
    b = results["before"][metric]
    return {k: results[k][metric] - b for k in ("repbn_no_finetune", "after_finetune", "after_fold") if k in results}


def _train_summary(result, cfg, task_kind: str) -> dict:
    if result is None:
        return {"steps_done": 0}
    rate = "images_per_second" if task_kind == VISION else "tokens_per_second"
    return {"steps_done": result.steps_done, rate: result.tokens_per_second, "peak_memory_mb": result.peak_memory_mb,
            "backoffs": result.backoffs, "resumed_from": result.resumed_from, "config": cfg.model_dump(mode="json"),
            "history": result.history, "evals": result.evals}
