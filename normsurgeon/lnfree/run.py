"""``remove_ln``: remove every norm of a Pre-LN model (calibrate only, or with the staged fine-tune),
measure what it costs, and write the stock and native forms.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "t.txt").write_text("DEF F(X):\\n    RETURN X + 1\\n" * 400)  # bytes < 96 (vocab)
>>> r = remove_ln("normsurgeon.testing:tiny_gpt2", d / "out", RemoveLnOptions(data=str(d / "t.txt"),
...               tokenizer="bytes", overrides={"block_size": 32, "batch_size": 4, "eval_windows": 4}))
>>> r["status"], {"config.json", "native", "lnfree_report.md"} <= {p.name for p in (d / "out").iterdir()}
('ok', True)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from normsurgeon.version import __version__
from normsurgeon.diagnose.run import max_positions
from normsurgeon.dtype_context import default_dtype_for
from normsurgeon.errors import UnsupportedModel, UsageError, VerificationFailed
from normsurgeon.io.formats import CUSTOM_PREFIX
from normsurgeon.io.loader import LoadedModel, load_model
from normsurgeon.io.destination import Destination, claim_output
from normsurgeon.io.writer import copy_tagalong_files, write_safetensors
from normsurgeon.lnfree.calibrate import calibrate
from normsurgeon.lnfree.export import (BIG_EPS, NativeFormUnavailable, StockFormUnavailable, build_stock_model,
                                       fold_native, native_blocker, stock_blocker)
from normsurgeon.lnfree.hooks import LnRemovalHooks
from normsurgeon.lnfree.recipe import RemoveLnRecipe, load_lnfree_recipe
from normsurgeon.lnfree.report import loss_curve_png, write_report
from normsurgeon.lnfree.schedule import ScheduleRunner
from normsurgeon.lnfree.sites import Sites, install
from normsurgeon.train.checkpoint import checkpoint_note, discard_checkpoints, latest_checkpoint
from normsurgeon.train.data import check_fits, heldout_windows, load_token_data, tokenizer_for
from normsurgeon.train.evaluate import heldout_loss
from normsurgeon.train.loop import TrainHooks, is_main_process, make_accelerator, run_progress, train
from normsurgeon.train.options import TrainingRunOptions
from normsurgeon.verification.metrics import THRESHOLDS, dtype_name, output_metrics

TARGETS = ("fixed", "dyt")


@dataclasses.dataclass
class RemoveLnOptions(TrainingRunOptions):
    """Everything ``remove_ln`` needs besides the model and the output folder (shared fields: ``TrainingRunOptions``)."""

    to: str = "fixed"  # "fixed" (fixed-scale, Heimersheim 2024) | "dyt" (Dynamic Tanh)
    recipe: str | Path = "remove-ln-tiny"
    kl_weight: float | None = None
    uniform_scale_weight: float | None = None
    control: bool = False
    split_qkv: bool = True


def resolve_recipe(opts: RemoveLnOptions) -> RemoveLnRecipe:
    rec = load_lnfree_recipe(opts.recipe)
    train_cfg = rec.train.model_copy(update={k: v for k, v in opts.overrides.items() if v is not None})
    losses = rec.losses.model_copy(update={k: v for k, v in (("kl_weight", opts.kl_weight),
                                                             ("uniform_scale_weight", opts.uniform_scale_weight)) if v is not None})
    rec = rec.model_copy(update={"train": type(rec.train).model_validate(train_cfg.model_dump()), "losses": losses})
    return rec


def remove_ln(model: str, out: str | Path, opts: RemoveLnOptions, status: Callable[[str], None] = lambda s: None,
              progress: Callable[..., None] | None = None) -> dict:
    """Remove every norm of ``model`` and write the result to ``out``; return the report dict. ``progress``:
    ``progress(label, step, steps, unit="step", loss=, stage=)`` per training step (removal, control, whole job).

    Returns ``{"status": "interrupted", ...}`` (nothing written) when ``opts.stop_after`` stops the run.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if opts.to not in TARGETS:
        raise UsageError(f"--to must be one of {TARGETS}, not {opts.to!r}")
    if opts.data is None:
        raise UsageError("--data is required: the scales are calibrated (and the model fine-tuned) on text")
    if opts.control and not opts.finetune:
        raise UsageError("--control fine-tunes a with-norm copy; it needs --finetune")
    rec = resolve_recipe(opts)
    ckpt_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else Path(str(out) + ".checkpoints")
    with claim_output(out, inputs=[model, opts.data, opts.tokenizer], overwrite=opts.overwrite or
                      opts.stop_after is not None, status=status, also=[("--checkpoint-dir", ckpt_dir)],
                      lock=is_main_process()) as dest:
        return _remove_ln(model, dest, opts, rec, ckpt_dir, status, t0, progress)


def _remove_ln(model: str, dest: Destination, opts: RemoveLnOptions, rec: RemoveLnRecipe, ckpt_dir: Path,
               status: Callable[[str], None], t0: float, progress: Callable[..., None] | None = None) -> dict:
    out, cfg = dest.path, rec.train
    acc = make_accelerator()
    rank, world = acc.process_index, acc.num_processes
    status("loading the model")
    src = load_model(model, allow_pickle=opts.allow_pickle, trust_remote_code=opts.trust_remote_code)
    early_notes = []
    limit = max_positions(src.model)
    if limit is not None and cfg.block_size > limit:  # windows must fit the position tables (OPT: offset 2)
        early_notes.append(f"block size {cfg.block_size} exceeds the model's {limit} positions; windows of {limit} "
                           "tokens were used")
        status(early_notes[-1])
        cfg = cfg.model_copy(update={"block_size": limit})
        rec = rec.model_copy(update={"train": cfg})
    vocab = getattr(getattr(src.model, "config", None), "vocab_size", None)
    tok = tokenizer_for(src.path, vocab, opts.tokenizer)
    status(f"loading data ({opts.data}, tokenizer {tok.name})")
    data = load_token_data(opts.data, tok, opts.text_field)
    check_fits(data, cfg.block_size, vocab, tok)
    windows = heldout_windows(data.heldout, cfg.eval_windows, cfg.block_size, cfg.eval_seed)
    src.model.to(acc.device)
    before = heldout_loss(src.model, windows)

    work = copy.deepcopy(src.model)
    teacher = None
    if rec.losses.kl_weight > 0 and opts.finetune:
        teacher = src.model.eval().requires_grad_(False)
    sites = install(work, mode=opts.to, momentum=rec.schedule.momentum, split_qkv=opts.split_qkv,
                    dyt_alpha0=rec.dyt_alpha0)
    _preflight(src, work, sites, windows)
    status(f"calibrating {len(sites.sites)} norms on {rec.calibration_batches} batches")
    calibrated = calibrate(sites, data, rec.calibration_batches, cfg.batch_size, cfg.block_size, cfg.seed,
                           rank, world, cfg.micro_batch_size)
    probe = copy.deepcopy(work)
    ScheduleRunner(rec.schedule, Sites(probe, sites.sites, sites.norm_map)).finish()
    removed_no_ft = heldout_loss(probe, windows)
    del probe

    runner = ScheduleRunner(rec.schedule, sites)
    result = ctrl_result = None
    labels = ("removal (fine-tune)", "control (with norms)")
    bars = run_progress(progress, dict.fromkeys(labels[:1 + opts.control], cfg.steps))
    if opts.finetune:
        hooks = LnRemovalHooks(runner, sites, rec.losses, teacher)
        removal_dir = ckpt_dir / "removal"
        status(f"fine-tuning with staged removal ({cfg.steps} steps, {world} process(es))")
        result = train(work, data, cfg, hooks=hooks, checkpoint_dir=removal_dir,
                       resume=opts.resume and latest_checkpoint(removal_dir) is not None, progress=opts.progress,
                       stop_after=opts.stop_after, log=status, accelerator=acc, on_progress=bars[labels[0]])
        if result.stopped_at is not None:
            return {"status": "interrupted", "step": result.stopped_at, "checkpoint": result.checkpoint}
    late = runner.finish()
    work.eval()
    after = heldout_loss(work, windows)
    control_loss, ctrl = None, None
    if opts.control:
        ctrl = copy.deepcopy(src.model).requires_grad_(True)
        control_dir = ckpt_dir / "control"
        status(f"fine-tuning the with-norm control ({cfg.steps} steps)")
        ctrl_result = train(ctrl, data, cfg, hooks=TrainHooks(), checkpoint_dir=control_dir,
                            resume=opts.resume and latest_checkpoint(control_dir) is not None,
                            progress=opts.progress, log=status, accelerator=acc, on_progress=bars[labels[1]])
        control_loss = heldout_loss(ctrl, windows)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return {"status": "ok", "rank": rank}

    status("exporting (float64 fold, stock form, checks)")
    report = _export_and_report(src, work, sites, out, opts, rec, windows, ctrl, status)
    losses = {"before": before, "removed_no_finetune": removed_no_ft, "after": after, "control": control_loss,
              "gap_vs_control": None if control_loss is None else after - control_loss,
              "unit": "nats/token" + (" (byte)" if tok.name == "bytes" else "")}
    notes = early_notes + [f"`{s.name}`: {s.note}" for s in sites.sites if s.note]
    if late and opts.finetune:  # calibrate-only: every event comes after the (absent) training, by design
        notes.append(f"{len(late)} removal event(s) came after the last training step and were applied without "
                     "fine-tuning: " + ", ".join(f"{e.norm}:{e.path}" for e in late))
    if result is not None and result.backoffs:
        notes.append(f"{result.backoffs} loss spike(s) backed off")
    report.update({
        "losses": losses, "notes": notes,
        "sigmas": {s.name: {"role": s.role, "sigma": float(sites.module(s.name).sigma),
                            "calibrated": calibrated[s.name], "family": s.family} for s in sites.sites},
        "method": {"to": opts.to, "finetune": opts.finetune, "split_qkv": [s.name for s in sites.sites if s.split]},
        "recipe": rec.model_dump(mode="json"),
        "data": data.description,
        "train": _train_summary(result, world),
        "control_train": _train_summary(ctrl_result, world) if ctrl_result else None,
        "timing_s": round(time.perf_counter() - t0, 1),
    })
    used = [d for d, on in (("removal", opts.finetune), ("control", opts.control)) if on]
    report["checkpoints"] = checkpoint_note(ckpt_dir, out, opts.keep_checkpoints, used)
    with dest.staging() as tmp:
        _write_outputs(tmp, report, src, result, ctrl_result, runner)
    if used and not opts.keep_checkpoints:
        discard_checkpoints(ckpt_dir, used, whole=opts.checkpoint_dir is None)
    return report


def _train_summary(result, world: int) -> dict:
    if result is None:
        return {"steps_done": 0}
    return {"steps_done": result.steps_done, "tokens_per_second": result.tokens_per_second,
            "peak_memory_mb": result.peak_memory_mb, "backoffs": result.backoffs, "processes": world,
            "resumed_from": result.resumed_from, "history": result.history, "evals": result.evals}


def _preflight(src: LoadedModel, work: torch.nn.Module, sites: Sites, windows: torch.Tensor) -> None:
    """Before any calibration or training: refuse a model that no form can be written for, and check that
    installing the norms (and baking embedding norms into their tables) left the function unchanged."""
    native_why, stock_why = native_blocker(work, sites.sites), stock_blocker(work, sites.sites)
    if native_why and stock_why:
        raise UnsupportedModel(f"no form of the result can be written: no native form ({native_why}) and no stock "
                               f"form ({stock_why})"[:400], {"native": native_why, "stock": stock_why})
    ids = windows[:2, : min(32, windows.shape[1])]
    m = _max_dlogprob(src.model.eval(), work.eval(), ids)
    th = THRESHOLDS.get(dtype_name(src.dtype), THRESHOLDS["float32"])["max_abs_logprob"]
    if m["max_abs_logprob"] > th:
        baked = [s.name for s in sites.sites if s.role == "embedding"]
        why = (f"baking {', '.join(f'`{b}`' for b in baked)} into its table (does the norm read more than the rows?)"
               if baked else "replacing the norms (a norm computes something its probed kind does not describe)")
        raise UnsupportedModel(f"cannot remove the norms: {why} changed the outputs by {m['max_abs_logprob']:.2e} "
                               "(max |Δ log-prob|) before any was removed")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits on the CPU; ``ids`` go to the model's device (the fake model may sit on an accelerator)."""
    dev = next(model.parameters()).device
    with torch.no_grad(), default_dtype_for(model):
        return model(input_ids=ids.to(dev)).logits.cpu()


def _max_dlogprob(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> dict:
    return output_metrics(_logits(a, ids), _logits(b, ids))


def _float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 eval copy. Fused-expert kernels (grouped_mm) take no float64: such copies run the eager path."""
    m = copy.deepcopy(model).double().eval()
    cfg = getattr(m, "config", None)
    if getattr(cfg, "_experts_implementation", None) not in (None, "eager") and hasattr(m, "set_experts_implementation"):
        try:
            m.set_experts_implementation("eager")
        except (ValueError, ImportError, AttributeError):
            pass
    return m


def _export_and_report(src: LoadedModel, work: torch.nn.Module, sites: Sites, out: Path, opts: RemoveLnOptions,
                       rec: RemoveLnRecipe, windows: torch.Tensor, ctrl, status) -> dict:
    sites.remove_hooks()
    out_dtype = src.dtype
    ids = windows[:4, : min(64, windows.shape[1])]
    fake64 = _float64(work)
    native64, info, native_status = copy.deepcopy(fake64), None, {}
    try:
        info = fold_native(native64, sites.sites)
    except NativeFormUnavailable as e:
        native64, native_status = None, {"why_not": str(e)}
    if native64 is not None:
        m_native = _max_dlogprob(fake64, native64, ids)
        if m_native["max_abs_logprob"] > THRESHOLDS["float64"]["max_abs_logprob"]:
            raise VerificationFailed(f"the native form differs from the fake-norm model by "
                                     f"{m_native['max_abs_logprob']:.2e} in float64; nothing written")
        native_status = {"float64_vs_fake": m_native["max_abs_logprob"], "identity": info.identity,
                         "created_bias": info.created_bias, "untied": info.untied, "dyt": list(info.dyt)}
    stock_info: dict[str, Any] = {}
    stock64 = None
    try:
        stock64 = build_stock_model(fake64, sites.sites)
        m_stock = _max_dlogprob(fake64, stock64, ids)
        # The stock classes may compute their norms in float32 whatever the model's dtype (Llama's RMSNorm):
        # the stock form is held to the float32 tolerance even in float64.
        th = THRESHOLDS["float32"]["max_abs_logprob"]
        if m_stock["max_abs_logprob"] > th:
            raise VerificationFailed(f"the stock form (eps trick) differs from the fake-norm model by "
                                     f"{m_stock['max_abs_logprob']:.2e} in float64; nothing written")
        max_gain = max(float(getattr(stock64.get_submodule(s.name), sites.module(s.name).weight_attr).detach().abs().max())
                       for s in sites.sites)
        stock_info = {"class": type(work).__name__, "eps": BIG_EPS, "float64_vs_fake": m_stock["max_abs_logprob"],
                      "max_gain": max_gain,
                      "fp16_warning": f"the stock form's norm gains reach {max_gain:.3g}, above the float16 maximum "
                                      "65504: in float16 it overflows (NaN/inf); bfloat16 and float32 are fine"}
    except StockFormUnavailable as e:
        stock_info = {"why_not": str(e)}
    if native64 is None and stock64 is None:  # _preflight refuses these before any work; kept as a guard
        raise UnsupportedModel(f"no form of the result can be written: no native form ({native_status['why_not']}) "
                               f"and no stock form ({stock_info['why_not']})")
    native_cfg = _native_config(src, work, info, sites) if native64 is not None else None
    status_dict = {"native": native_status, "stock": stock_info}
    report = {"status": "ok", "source": {"ref": src.ref, "class": type(work).__name__},
              "output": {"path": str(out), "dtype": dtype_name(out_dtype)},
              "export": status_dict, "tool": {"normsurgeon": __version__, "torch": torch.__version__}}
    report["_write"] = {"native64": native64, "native_cfg": native_cfg, "stock64": stock64, "out_dtype": out_dtype,
                        "ctrl": ctrl, "ids": ids, "fake64": fake64, "sigmas": sites.sigmas()}
    return report


def _native_config(src: LoadedModel, work: torch.nn.Module, info, sites: Sites) -> dict:
    cfg = dict(src.config) if src.config else work.config.to_dict()
    cfg.pop("torch_dtype", None)
    if info.untied or getattr(getattr(work, "config", None), "tie_word_embeddings", None) is False:
        cfg["tie_word_embeddings"] = False  # folded or baked: the head and the input table differ
    cfg["normsurgeon"] = {
        "format": "lnfree-native", "version": 1, "normsurgeon_version": __version__,
        "source_model_type": cfg.get("model_type"), "source_architecture": type(work).__name__,
        "stock_loadable": False, "rmsnorm": {}, "identity": info.identity, "created_bias": sorted(info.created_bias),
        "crms": None, "dyt": info.dyt,
        "sigmas": {s.name: float(sites.module(s.name).sigma) for s in sites.sites},
    }
    if cfg.get("model_type"):
        cfg["model_type"] = CUSTOM_PREFIX + cfg["model_type"]
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(work).__name__]
    return cfg


def _write_outputs(tmp: Path, report: dict, src: LoadedModel, result, ctrl_result, runner: ScheduleRunner) -> None:
    w = report.pop("_write")
    out_dtype = w["out_dtype"]
    stock64 = w["stock64"]
    ids = w["ids"]
    loaded_native = None
    if w["native64"] is not None:
        native_dir = tmp / "native" if stock64 is not None else tmp
        native_dir.mkdir(exist_ok=True)
        native = w["native64"].to(out_dtype)
        native_cfg = dict(w["native_cfg"], dtype=dtype_name(out_dtype))
        write_safetensors(native.state_dict(), native_dir, 5 * 10**9, {"normsurgeon": "lnfree-native"})
        (native_dir / "config.json").write_text(json.dumps(native_cfg, indent=2, sort_keys=True))
        copy_tagalong_files(src.path, native_dir)
        report["export"]["native"]["path"] = "." if native_dir == tmp else "native"  # relative to the output
        loaded_native = load_model(str(native_dir)).model.float().eval()
    if stock64 is not None:
        stock = stock64.to(out_dtype)
        import transformers

        transformers.utils.logging.disable_progress_bar()
        stock.save_pretrained(str(tmp))
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["normsurgeon"] = {"format": "lnfree-stock", "version": 1, "stock_loadable": True,
                              "source_model_type": cfg.get("model_type"), "source_architecture": type(stock).__name__,
                              "eps_trick": {"eps": BIG_EPS, "gain_scale": "1e6 / sigma"},
                              "sigmas": w["sigmas"]}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        copy_tagalong_files(src.path, tmp)
        loaded_stock = load_model(str(tmp), stock=True).model.float().eval()
        th = THRESHOLDS.get(dtype_name(out_dtype), THRESHOLDS["float32"])["max_abs_logprob"]
        other, key, what = ((loaded_native, "written_vs_native", "native form") if loaded_native is not None else
                            (w["fake64"].float(), "written_vs_fake", "fake-norm model"))
        m = _max_dlogprob(loaded_stock, other, ids)
        report["export"]["stock"].update(path=".", **{key: {**m, "dtype": dtype_name(out_dtype), "threshold": th}})
        if m["max_abs_logprob"] > th:
            raise VerificationFailed(f"the written stock form and the {what} disagree by {m['max_abs_logprob']:.2e}; "
                                     "nothing written")
    if loaded_native is not None:
        m_fake = _max_dlogprob(w["fake64"].float(), loaded_native, ids)
        report["export"]["native"]["written_vs_fake_float32"] = m_fake["max_abs_logprob"]
    if w["ctrl"] is not None:
        (tmp / "control").mkdir()
        w["ctrl"].save_pretrained(str(tmp / "control"))
        copy_tagalong_files(src.path, tmp / "control")
        report["export"]["control_path"] = "control"
    events = [{"step": h["step"], "stage": e_stage, "norm": ev}
              for h in (result.history if result else []) for ev in h["events"]
              for e_stage in [next(e.stage for e in runner.events if f"{e.norm}:{e.path}" == ev)]]
    report["events"] = events
    sig = {k: v for k, v in report["sigmas"].items()}
    (tmp / "sigmas.json").write_text(json.dumps(sig, indent=2))
    (tmp / "normsurgeon_recipe.yaml").write_text(yaml.safe_dump(report["recipe"], sort_keys=False))
    if result is not None and result.history:
        loss_curve_png(tmp / "loss_curve.png", result.history, ctrl_result.history if ctrl_result else None,
                       events, report["losses"])
        report["loss_curve"] = "loss_curve.png"
    write_report(report, tmp)
    _write_card(tmp, report, src, stock64 is not None, loaded_native is not None)


def _write_card(tmp: Path, report: dict, src: LoadedModel, stock: bool, native: bool) -> None:
    from normsurgeon.io.model_card import write_model_card

    m, ex = report["method"], report["export"]
    what = "a fixed scale" if m["to"] == "fixed" else "Dynamic Tanh (DyT)"
    done = [f"every normalization layer ({len(report['sigmas'])}) removed: replaced by {what} calibrated on "
            f"the data" + (f", then {report['train'].get('steps_done', 0)} fine-tuning steps with the staged removal "
                           "schedule" if m["finetune"] else " (no fine-tuning)")]
    if stock:
        done.append(f"top level: the stock form (stock `{ex['stock'].get('class')}`; each norm is kept as a LayerNorm "
                    f"with eps {ex['stock'].get('eps'):g}, so it computes the fixed scale)")
    if native:
        done.append(("`native/`" if stock else "top level") + ": the native form (norms folded into their readers; "
                    "loads with normsurgeon)")
    if ex.get("control_path"):
        done.append("`control/`: the with-norm control, fine-tuned on the same data (stock class)")
    notes = []
    if stock and native:
        notes.append(f"`normsurgeon.load({json.dumps(str(Path(report['output']['path']) / 'native'))}).model` loads "
                     "the native form")
    if stock and ex["stock"].get("fp16_warning"):
        notes.append(ex["stock"]["fp16_warning"])
    write_model_card(tmp, src.ref, src.path, "remove-ln", report, stock, done,
                     output_path=report["output"]["path"], loading_notes=notes)
