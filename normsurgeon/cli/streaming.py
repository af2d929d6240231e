"""The memory-bounded paths of the command line: the header-only plan (the ``plan`` command,
``cli/plan.py``) and the streaming paths of ``convert`` / ``verify``.

``cli/convert.py`` calls ``run_streaming_convert`` for ``--dry-run``, ``--stream``, ``--resume`` or
``--max-memory`` (or when the checkpoint would not fit in memory), and ``cli/verify.py`` calls
``run_layerwise_verify`` for ``--layerwise``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from normsurgeon.cli.exits import verification_exit
from normsurgeon.cli.output import emit


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def print_plan(d: dict, console) -> None:
    from rich.table import Table

    inv = d["inventory"]["counts"]
    console.print(f"[bold]{d['architecture']}[/] -> pre-{d['target']} ({d['bias_policy']}), output {d['output_dtype']}; "
                  f"{d['checkpoint']['tensors']} tensors in {len(d['checkpoint']['files'])} file(s), "
                  f"{_human(d['checkpoint']['bytes'])}", highlight=False)
    console.print(f"tensors: {inv['transformed']} transformed, {inv['copied']} copied, {inv['added']} added "
                  f"({', '.join(d['inventory']['added']) or '-'}), {inv['dropped']} dropped", highlight=False)
    t = Table(title="groups (processed in this order)")
    for col in ("group", "jobs", "reads", "working memory"):
        t.add_column(col)
    for g in d["groups"]:
        t.add_row(g["name"], str(g["jobs"]), _human(g["read_bytes"]), _human(g["peak_bytes"]))
    console.print(t)
    mem = d["memory"]
    console.print(f"estimated peak memory: [bold]{_human(mem['peak_bytes'])}[/] (largest group {mem['largest_group']}, "
                  f"+{_human(mem['baseline_bytes'])} baseline, +{_human(mem['pipeline_bytes'])} read ahead / "
                  "waiting to be written)", highlight=False)
    if d["assumed_nonzero_shifts"]:
        console.print("note: planned from headers only, assuming every norm shift is non-zero (the conversion "
                      "reads the shifts and may fold more)", highlight=False)
    for note in d["plan"]["notes"]:
        console.print(f"note: {note}", highlight=False)


def run_plan(model: str, to: str, bias_policy: Optional[str], dtype: str, max_memory: Optional[str],
             json_out: bool, console) -> int:
    from normsurgeon.conversion import parse_dtype
    from normsurgeon.io.writer import parse_size
    from normsurgeon.recipes import recipe_for_target
    from normsurgeon.stream.plan import check_budget, plan_streaming, validate_options

    policy = bias_policy or recipe_for_target(to).bias_policy
    validate_options(to, policy)
    plan = plan_streaming(Path(model), to, policy, parse_dtype(dtype))
    d = plan.to_dict()
    if json_out:
        emit(d, "plan")
    else:
        print_plan(d, console)
    check_budget(plan, parse_size(max_memory) if max_memory else None)
    return 0


def should_stream(model: str) -> bool:
    """Stream when ``model`` is a safetensors folder too large to convert in memory (about 3x in float64)."""
    from normsurgeon.stream.pipeline import _available_memory
    from normsurgeon.stream.headers import read_checkpoint_index

    path = Path(model)
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        return False
    try:
        numel = sum(t.numel for t in read_checkpoint_index(path).tensors.values())
    except Exception:  # noqa: BLE001 - a bad folder is reported by the command that reads it
        return False
    return numel * 20 > _available_memory()


def run_streaming_convert(model: str, out: Path, *, to: str, recipe: Optional[str] = None,
                          bias_policy: Optional[str], dtype: str,
                          overwrite: bool, no_verify: bool, max_shard_size: str, max_memory: Optional[str],
                          resume: bool, dry_run: bool, verify_mode: str, json_out: bool, console, status,
                          streamed_for_memory: bool = False, progress: Optional[Callable] = None,
                          max_logprob_delta: Optional[float] = None) -> int:
    if dry_run:
        if recipe is not None:  # the plan of what the recipe would do (stream_convert checks it fully)
            from normsurgeon.conversion import load_conversion_recipe

            rec = load_conversion_recipe(recipe, to)
            to, bias_policy = rec.target, bias_policy or rec.bias_policy
        return run_plan(model, to, bias_policy, dtype, max_memory, json_out, console)
    from normsurgeon.stream import stream_convert
    from normsurgeon.verification.report import print_report

    report = stream_convert(Path(model), out, to=to, recipe=recipe, bias_policy=bias_policy, dtype=dtype,
                            max_shard_size=max_shard_size, max_memory=max_memory, resume=resume,
                            overwrite=overwrite, verify="none" if no_verify else verify_mode, status=status,
                            streamed_for_memory=streamed_for_memory, progress=progress,
                            max_logprob_delta=max_logprob_delta)
    if json_out:
        emit(report, "equivalence")
    else:
        if report.get("metrics"):
            print_report(report, console)
        s = report["streaming"]
        console.print(f"wrote {out} ({report['output']['format']}, {report['output']['dtype']}) by streaming "
                      f"{s['groups']} groups ({s['resumed_groups']} resumed); peak RSS {_human(s['peak_rss_bytes'])}, "
                      f"verification: {s['verify_mode']}", highlight=False)
    return 0


def run_layerwise_verify(source: str, converted: str, *, num: int, seq_len: int, seed: int, text: Optional[Path],
                         json_out: bool, console, progress: Optional[Callable] = None) -> int:
    from normsurgeon.verification.layerwise import verify_layerwise
    from normsurgeon.verification.report import print_report

    report = verify_layerwise(Path(source), Path(converted), num=num, seq_len=seq_len, seed=seed, text_file=text,
                              progress=progress)
    if json_out:
        emit(report, "equivalence")
    else:
        print_report(report, console)
        for p in report["per_layer"]:
            console.print(f"  {p['point']}: stream rel. L2 {p['resid_rel_l2']:.2e}, block alone {p['local_rel_l2']:.2e}",
                          highlight=False)
    return verification_exit(report)
