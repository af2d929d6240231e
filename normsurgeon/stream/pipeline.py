"""``stream_convert``: the streaming conversion end to end (plan, execute, config and report, verify,
move into place). See ``execute.py`` for how the plan is run.

>>> import tempfile, pathlib
>>> from normsurgeon.testing import tiny_gpt2
>>> d = pathlib.Path(tempfile.mkdtemp()); tiny_gpt2().save_pretrained(d / "src")
>>> r = stream_convert(d / "src", d / "out", verify="layerwise")
>>> r["status"], r["streaming"]["groups"]
('pass', 4)
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

import yaml

from normsurgeon.errors import UsageError, VerificationFailed
from normsurgeon.io.destination import (SPACE_ERRNOS, Destination, claim_output, raise_if_out_of_space,
                                        replace_folder)
from normsurgeon.io.writer import copy_tagalong_files, parse_size
from normsurgeon.stream.execute import PROGRESS, execute_plan, partial_folder
from normsurgeon.stream.malloc_tuning import TUNE_FROM_BYTES, tune_malloc
from normsurgeon.stream.plan import StreamPlan, check_budget, plan_streaming, validate_options
from normsurgeon.stream.verify_memory import available_memory as _available_memory, choose_verify_mode

def stream_convert(source: str | Path, out: str | Path, *, to: str = "rmsnorm", recipe: str | Path | None = None,
                   bias_policy: str | None = None,
                   dtype: str | None = None, max_shard_size: str | int = "5GB", max_memory: str | int | None = None,
                   resume: bool = False, overwrite: bool = False, verify: str = "auto",
                   status: Callable[[str], None] = lambda s: None,
                   on_group_done: Callable[[str], None] | None = None, direct_io: bool | None = None,
                   streamed_for_memory: bool = False, progress: Callable[..., None] | None = None,
                   max_logprob_delta: float | None = None) -> dict:
    """Convert the safetensors folder ``source`` group by group and write it to ``out``; return the report.

    ``recipe``: a recipe file or built-in name (overrides ``to``); its steps, a subset of the standard
    steps in their order (``stream/jobs.py``). ``verify``: "auto" (layer by layer when
    ``streamed_for_memory``, i.e. the caller streams because the model does not fit in memory; else
    whole-model when its measured estimate fits: ``stream/verify_memory.py``), "whole", "layerwise" or
    "none". ``max_memory``
    refuses (exit 6) a plan whose estimated peak is above it.
    ``on_group_done(name)`` is called from the writer thread once every byte of a group is written and
    recorded in ``progress.json`` (so also for groups finished after an interrupt in the main thread).
    ``max_logprob_delta``: an explicit max |delta log-prob| for whole-model verification (recorded).
    ``direct_io``: write the shards with ``O_DIRECT`` where the file system allows it (past the page
    cache; ``stream/direct_writer.py``), else through the page cache; None: on unless the environment
    sets ``NORMSURGEON_DIRECT_IO=0``. ``progress(label, completed, total, unit=...)``: bytes written
    ("convert", unit "B") and blocks compared by a layerwise verification (``cli/progress.py``).
    """
    from normsurgeon.conversion_output import load_conversion_recipe

    t0 = time.perf_counter()
    source, out = Path(source), Path(out)
    rec = load_conversion_recipe(recipe, to)
    policy = bias_policy or rec.bias_policy
    validate_options(rec.target, policy)
    if verify not in ("auto", "whole", "layerwise", "none"):
        raise UsageError(f"verify must be auto, whole, layerwise or none, not {verify!r}")
    if verify == "layerwise" and max_logprob_delta is not None:
        raise UsageError("an explicit max |delta log-prob| applies to whole-model verification, not layer by layer")
    budget = parse_size(max_memory) if max_memory is not None else None
    max_bytes = parse_size(max_shard_size)
    if direct_io is None:
        direct_io = os.environ.get("NORMSURGEON_DIRECT_IO", "1") != "0"
    keep = [partial_folder(out)] if resume else []
    with claim_output(out, inputs=[source], overwrite=overwrite, status=status, keep=keep) as dest:
        try:
            return _stream_convert(source, dest, rec, policy, dtype, budget, max_bytes, resume, verify, status,
                                   on_group_done, direct_io, t0, streamed_for_memory=streamed_for_memory,
                                   progress=progress, max_logprob_delta=max_logprob_delta)
        except OSError as e:
            if e.errno in SPACE_ERRNOS:  # a full disk: nothing to resume into; free the space
                shutil.rmtree(partial_folder(out), ignore_errors=True)
                raise_if_out_of_space(e, out)
            if not _finished_groups(partial_folder(out)):  # nothing worth resuming
                shutil.rmtree(partial_folder(out), ignore_errors=True)
            raise


def _stream_convert(source: Path, dest: Destination, rec, policy: str, dtype: str | None, budget: int | None,
                    max_bytes: int, resume: bool, verify: str, status: Callable[[str], None],
                    on_group_done: Callable[[str], None] | None, direct_io: bool, t0: float, *,
                    streamed_for_memory: bool = False, progress: Callable[..., None] | None = None,
                    max_logprob_delta: float | None = None) -> dict:
    from normsurgeon.conversion_output import config_json, parse_dtype, tool_versions, write_conversion_card
    from normsurgeon.verification.report import failure_line, write_report

    out, to = dest.path, rec.target
    if sum(f.stat().st_size for f in source.glob("*.safetensors")) >= TUNE_FROM_BYTES:
        tune_malloc()  # predictable resident memory; before planning (stream/malloc_tuning.py)

    status("planning from config.json, the safetensors headers and the norm shifts")
    plan = plan_streaming(source, to, policy, parse_dtype(dtype), read_shifts=True, steps=rec.steps)
    check_budget(plan, budget)

    t_plan = time.perf_counter() - t0

    tmp = partial_folder(out)
    if resume and tmp.exists():
        status(f"resuming the partial output {tmp.name}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        stats = execute_plan(plan, tmp, max_bytes, {"normsurgeon_recipe": rec.name}, resume, status, on_group_done,
                             direct=direct_io, progress=progress)
    except KeyboardInterrupt:
        status(f"interrupted: the partial output stays in {tmp}; run again with --resume to finish it")
        raise
    t_convert = time.perf_counter() - t0 - t_plan

    cfg = config_json(plan.config, plan.model_class, False, plan.rms_plan, rec, plan.out_dtype, rec.steps)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    copied = copy_tagalong_files(source, tmp)
    resolved = {"recipe": rec.model_dump(), "bias_policy": policy, "plan": plan.rms_plan.to_dict()}
    (tmp / "normsurgeon_recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    report: dict = {"status": "not-verified"}
    mode, why = choose_verify_mode(plan, verify, budget=budget, streamed_for_memory=streamed_for_memory,
                                   available=_available_memory())
    if mode != "none":
        status(f"verifying ({mode}): {why}")
        if mode == "layerwise" and max_logprob_delta is not None:
            raise UsageError("an explicit max |delta log-prob| applies to whole-model verification, not layer by "
                             "layer: pass --verify-mode whole")
        report = _verify(source, tmp, mode, plan, rec, progress, max_logprob_delta)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report.update({
        "tool": tool_versions(),
        "recipe": {"name": rec.name, "target": rec.target, "bias_policy": policy},
        "plan": plan.to_dict()["plan"] | {"kept_on_norm": {f.norm: f.reason for f in plan.rms_plan.folds
                                                            if not f.fold_gain}},
        "inventory": {**plan.inventory["counts"], "added": plan.inventory["added"],
                      "dropped": plan.inventory["dropped"], "shards": stats["shards"], "tagalong": copied},
        "stock_loadable": plan.rms_plan.stock_loadable,
        "streaming": {"groups": len(plan.groups), "resumed_groups": stats["resumed_groups"],
                      "estimated_peak_bytes": plan.peak_bytes, "peak_rss_bytes": peak,
                      "checkpoint_bytes": plan.checkpoint.total_bytes, "bytes_written": stats["bytes_written"],
                      "direct_io": stats["direct_io"],
                      "verify_mode": mode, "verify_reason": why},
    })
    report.setdefault("source", {"ref": str(source)})
    report.setdefault("output", {})
    report["output"].update({"path": str(out), "dtype": str(plan.out_dtype).replace("torch.", ""),
                             "format": f"pre-{plan.target}"})
    report["timing_s"] = {**report.get("timing_s", {}), "plan": round(t_plan, 3), "convert": round(t_convert, 3),
                          "total": round(time.perf_counter() - t0, 3)}
    write_report(report, tmp)
    write_conversion_card(tmp, str(source), source, plan.rms_plan, rec, report, out)
    if report["status"] == "fail":
        shutil.rmtree(tmp, ignore_errors=True)
        raise VerificationFailed(f"verification failed, nothing written: {failure_line(report)}", report)
    (tmp / PROGRESS).unlink(missing_ok=True)
    dest.check_free()
    replace_folder(tmp, out)
    return report


def _finished_groups(tmp: Path) -> list[str]:
    """The groups a partial output records as written (none when it has no readable progress file)."""
    try:
        return list(json.loads((tmp / PROGRESS).read_text()).get("done", []))
    except (OSError, ValueError, AttributeError):
        return []


def _verify(source: Path, tmp: Path, mode: str, plan: StreamPlan, rec, progress=None,
            max_logprob_delta: float | None = None) -> dict:
    if mode == "layerwise":
        from normsurgeon.verification.layerwise import verify_layerwise

        return verify_layerwise(source, tmp, num=rec.verify.num_sequences, seq_len=rec.verify.seq_len,
                                seed=rec.verify.seed, progress=progress)
    from normsurgeon.verification.written import verify_written
    from normsurgeon.io.loader import load_model

    return verify_written(load_model(str(source)), tmp, plan.rms_plan.stock_loadable, rec.verify, None,
                          max_logprob_delta)
