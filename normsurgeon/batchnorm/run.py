"""``run_fold_bn``: load, fold, verify, and write a fold-bn output folder atomically.

Folder layout::

    OUT/config.json             stock config + "normsurgeon" section (format fold-bn, deploy structure)
    OUT/model.safetensors       stock-loadable form (folded BNs are exact identities)
    OUT/deploy/model.safetensors  deploy form weights (BN modules gone; load with normsurgeon)
    OUT/deploy/model.pt2        torch.export program of the deploy form
    OUT/equivalence_report.json / .md
    OUT/normsurgeon_recipe.yaml  the resolved settings and the fold plan
    OUT/README.md               the model card (io/model_card.py)

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "o"
>>> r = run_fold_bn("normsurgeon.batchnorm.examples:conv_bn_net", out, input_shape=(2, 3, 8, 8), export=False)
>>> r["status"], r["batchnorm"]["counts"]["left"]
('pass', 1)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from normsurgeon.batchnorm.deploy import FORMAT, export_program
from normsurgeon.batchnorm.fold import FoldResult, fold_batchnorms
from normsurgeon.batchnorm.verify_fold import verify_fold
from normsurgeon.errors import InputError, UsageError, VerificationFailed
from normsurgeon.io.example_inputs import accepts, random_batches


def example_batches(model: torch.nn.Module, input_shape: tuple[int, ...] | None, image_size: int | None,
                    num: int, seed: int) -> list:
    """Seeded random inputs, built from the model itself (``io/example_inputs.py``): HF models (images,
    audio ``input_values``, text...) and plain modules with an ``example_inputs()`` method. ``input_shape``
    replaces the main input of an HF model (passed by name: ``pixel_values``, ``input_values``...) and is
    the one positional input of a plain module."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    cfg = getattr(model, "config", None)
    has_factory = callable(getattr(model, "example_inputs", None))
    if input_shape is None and (cfg is not None or has_factory):
        size = image_size or getattr(cfg, "image_size", None) or 224
        return random_batches(model, num, 16, seed, image_size=size)  # 16 tokens or audio frames
    if input_shape is None:
        raise UsageError("cannot tell the model's input: pass --input-shape, e.g. 2,3,32,32 (or give the module "
                         "an `example_inputs()` method)")
    x = torch.randn(tuple(input_shape), generator=gen).to(dtype)
    main = getattr(model, "main_input_name", None) if cfg is not None else None
    if main and accepts(model, main):
        try:
            batch = random_batches(model, input_shape[0], 16, seed, image_size=image_size)[0]
        except InputError:
            batch = {}
        return [{**batch, main: x}]
    return [(x,)]


def _split(batch) -> tuple[tuple, dict]:
    return ((), batch) if isinstance(batch, dict) else (tuple(batch), {})


def _save_stock(result: FoldResult, loaded, tmp: Path, section: dict) -> None:
    from normsurgeon.io.writer import write_safetensors

    stock = result.stock
    if hasattr(stock, "save_pretrained") and getattr(stock, "config", None) is not None:
        stock.save_pretrained(str(tmp), safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())
    else:
        write_safetensors(stock.state_dict(), tmp, max_shard_bytes=5 * 10**9)
        cfg = {}
        section["factory"] = loaded.ref
    cfg["normsurgeon"] = section
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))


def run_fold_bn(ref: str, out: str | Path, *, input_shape: tuple[int, ...] | None = None,
                image_size: int | None = None, batch_size: int = 2, seed: int = 0, export: bool = True,
                overwrite: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False,
                dry_run: bool = False) -> dict:
    """Fold every foldable BN of ``ref`` and write ``out``; returns the report (raises on failed checks)."""
    from normsurgeon.io.destination import maybe_claim_output

    out = Path(out)
    with maybe_claim_output(None if dry_run else out, inputs=[ref], overwrite=overwrite) as dest:
        return _fold_bn(ref, out, dest, input_shape, image_size, batch_size, seed, export, allow_pickle,
                        trust_remote_code)


def _fold_bn(ref: str, out: Path, dest, input_shape: tuple[int, ...] | None, image_size: int | None,
             batch_size: int, seed: int, export: bool, allow_pickle: bool, trust_remote_code: bool) -> dict:
    from normsurgeon.io.loader import load_model
    from normsurgeon.io.writer import copy_tagalong_files, write_safetensors
    from normsurgeon.verification.report import SCHEMA, write_report

    dry_run = dest is None
    loaded = load_model(ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    model = loaded.model
    batches = example_batches(model, input_shape, image_size, batch_size, seed)
    args, kwargs = _split(batches[0])
    result = fold_batchnorms(model, args, kwargs)
    dtype_name = str(loaded.dtype).replace("torch.", "")
    check = verify_fold(model, result, batches, dtype_name)
    report = {"schema": SCHEMA, "status": check["status"], "command": "fold-bn",
              "exit_code": 0 if check["status"] == "pass" else VerificationFailed.exit_code,
              "source": {"ref": ref, "architecture": type(model).__name__, "dtype": dtype_name},
              "output": {"path": str(out), "dtype": dtype_name, "stock_loadable": True},
              "batchnorm": {"counts": result.counts, "units": result.entries},
              "fold_metrics": check["forms"], "metrics": _lead_metrics(check), "warnings": _warnings(result, check)}
    if dry_run:
        return report
    if check["status"] != "pass":
        worst = "; ".join(f"{k}: max |Δ| {v['max_abs']:.3e} (÷ output scale {v['rel_to_scale']:.3e}, worst on "
                          f"{v.get('worst_output')!r} of {v.get('outputs_compared')} outputs), top-1 "
                          f"{v['top1_agreement']:.4f}" for k, v in check["forms"].items() if not v["ok"])
        raise VerificationFailed(f"folded model differs from the source beyond tolerance, nothing written: {worst}",
                                 report)
    section = {"format": FORMAT, "version": 1, "stock_loadable": True, "source_architecture": type(model).__name__,
               "deploy": result.structure}
    with dest.staging() as tmp:
        _save_stock(result, loaded, tmp, section)
        (tmp / "deploy").mkdir()
        write_safetensors(result.deploy.state_dict(), tmp / "deploy", max_shard_bytes=5 * 10**9)
        if export:
            report["deploy_export"] = export_program(result.deploy, args, kwargs, tmp / "deploy" / "model.pt2")
            if report["deploy_export"].get("file"):  # paths in the report are relative to the output folder
                report["deploy_export"]["file"] = "deploy/model.pt2"
        copy_tagalong_files(loaded.path, tmp)
        write_settings(tmp, ref, report, input_shape=list(input_shape) if input_shape else None,
                       image_size=image_size, batch_size=batch_size, seed=seed, export=export,
                       allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        write_report(report, tmp)
        with open(tmp / "equivalence_report.md", "a") as f:
            f.write(units_markdown(result.entries))
        _write_card(tmp, out, ref, loaded, report, result, export, section)
    return report


SETTINGS = "normsurgeon_recipe.yaml"  # the name convert uses for its resolved recipe and plan


def write_settings(folder: Path, ref: str, report: dict, **settings) -> None:
    """The resolved settings and the fold plan (every unit: folded, merged or left, and into what) beside the
    weights, as ``convert`` writes its resolved recipe."""
    import yaml

    from normsurgeon.version import __version__

    doc = {"command": "fold-bn", "normsurgeon_version": __version__, "source": ref, "settings": settings,
           "plan": report["batchnorm"]}
    doc = json.loads(json.dumps(doc, default=str))  # plain YAML types only
    (folder / SETTINGS).write_text(yaml.safe_dump(doc, sort_keys=False))


def _write_card(tmp: Path, out: Path, ref: str, loaded, report: dict, result: FoldResult, export: bool,
                section: dict) -> None:
    from normsurgeon.io.model_card import write_model_card

    c = result.counts
    done = [f"every eval-mode BatchNorm the dataflow connects to a conv/linear folded into it: {c['folded']} folded, "
            f"{c['merged']} merged (re-parameterized branches), {c['left']} left (reasons in "
            "`equivalence_report.md`)",
            "top level: the stock form (the source class; each folded BatchNorm is an exact identity)",
            "`deploy/`: the deploy form (BatchNorm modules gone)" + (", and `deploy/model.pt2`, its `torch.export` "
                                                                      "program" if export else "")]
    stock_hf = "factory" not in section and (tmp / "config.json").is_file()
    path = json.dumps(str(out))
    notes = [f"`normsurgeon.load({path}).model` gives the deploy form; `normsurgeon.load({path}, stock=True).model` "
             "the stock form" + (f" (rebuilt from the factory `{ref}`)" if not stock_hf else "")]
    if export:
        notes.append(f"`torch.export.load({json.dumps(str(out / 'deploy' / 'model.pt2'))}).module()` runs the deploy "
                     "program")
    write_model_card(tmp, ref, loaded.path, "fold-bn", report, stock_hf, done, output_path=str(out),
                     loading_notes=notes)


def _warnings(result: FoldResult, check: dict) -> list[str]:
    out = []
    if not result.entries:
        out.append("no BatchNorm-like module found: nothing to fold (both forms are the source unchanged)")
    if check["forms"]["deploy"].get("output_scale", 1.0) == 0.0:
        out.append("every output tensor is zero on the example inputs: the equivalence check cannot see a wrong "
                   "fold (try other inputs: --seed, --image-size, --input-shape)")
    return out


def _lead_metrics(check: dict) -> dict:
    """The generic report's ``metrics`` table: one row per form and measure."""
    rows = {}
    for form, m in check["forms"].items():
        key = "max_abs_norm" if form == "deploy_float64" else "rel_to_scale"
        th = m["threshold"].get(key)
        label = " / max(1, scale)" if key == "max_abs_norm" else " / scale"
        rows[f"{form}: max|Δ|{label}"] = {"value": m[key], "threshold": th, "ok": m[key] <= th,
                                           "worst_output": m.get("worst_output")}
        if form != "deploy_float64":
            rows[f"{form}: top-1 agreement"] = {"value": m["top1_agreement"], "threshold": 1.0,
                                                "ok": m["top1_agreement"] == 1.0}
    return rows


def units_markdown(entries: list[dict]) -> str:
    from normsurgeon.markdown import md_code, md_table

    rows = [[md_code(e["name"]), e["kind"], e["action"], e.get("into") or "—",
             e.get("reason") if e["action"] == "left" else e.get("stock")] for e in entries]
    table = md_table(["unit", "kind", "action", "into", "stock form / reason"], rows)
    return "\n".join(["", "## BatchNorm units", "", table]) + "\n"
