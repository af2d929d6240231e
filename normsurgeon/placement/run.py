"""``run_place``: load (or build from a config), rewrite to a placement scheme, measure the loss change on
calibration data, and write the result atomically (stock class where one exists).

>>> import tempfile, pathlib
>>> tmp = pathlib.Path(tempfile.mkdtemp())
>>> _ = (tmp / "t.txt").write_text("A = B + 1\\nC = (A, 2)\\n" * 60)  # bytes < 96
>>> r = run_place("normsurgeon.testing:tiny_gpt2", tmp / "out", scheme="lns", data=str(tmp / "t.txt"),
...               tokenizer="bytes", calib_sequences=2, eval_sequences=2, seq_len=16)
>>> r["preservation"]["level"], abs(r["evaluation"]["delta_loss"]) < 1e-5
('exact', True)
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch

from normsurgeon.errors import InputError, UsageError
from normsurgeon.placement.apply import place
from normsurgeon.placement.evaluate import compare
from normsurgeon.placement.anatomy import find_anatomy
from normsurgeon.placement.spec import SCHEMES, build_spec, parse_block_spec


def model_from_config(ref: str, seed: int = 0) -> tuple[torch.nn.Module, dict, Path | None]:
    """A randomly initialised model from ``config.json`` (a file, or a folder holding one)."""
    import transformers as T

    path = Path(ref)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        raise InputError(f"--from-config: no config.json at {ref}")
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("normsurgeon", None)
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(T, arch or "", None)
    if cls is None:
        raise InputError(f"--from-config: config has no known `architectures` entry ({arch!r})")
    torch.manual_seed(seed)
    model = cls(T.AutoConfig.for_model(**cfg)).eval()
    return model, cfg, cfg_path.parent


def calibration_windows(data: str, model, folder, n_calib: int, n_eval: int, seq_len: int, seed: int,
                        tokenizer: str | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Calibration windows from the train split, evaluation windows from the held-out split."""
    from normsurgeon.train.data import heldout_windows, load_token_data, tokenizer_for

    tok = tokenizer_for(folder, getattr(model.config, "vocab_size", None), tokenizer)
    td = load_token_data(data, tok)
    held = td.heldout if td.heldout.numel() >= seq_len else td.train
    if td.train.numel() < seq_len:
        raise UsageError(f"--data has {td.train.numel()} training tokens, fewer than --seq-len {seq_len}")
    return (heldout_windows(td.train, n_calib, seq_len, seed), heldout_windows(held, n_eval, seq_len, seed + 1),
            td.description)


def run_place(model: str, out: Path | None, *, scheme: str | None = None, blocks: str | None = None,
              options: dict | None = None, from_config: bool = False, data: str | None = None,
              tokenizer: str | None = None, calib_sequences: int = 16, eval_sequences: int = 16, seq_len: int = 128,
              seed: int = 0, calibrate: bool = True, overwrite: bool = False, dry_run: bool = False,
              say: Callable[[str], None] | None = None) -> dict:
    """See the module docstring. ``scheme`` or ``blocks`` (a per-block spec string) must be given."""
    from normsurgeon.io.destination import maybe_claim_output

    say = say or (lambda msg: None)
    target = None if out is None or dry_run else Path(out)
    with maybe_claim_output(target, inputs=[model, data], overwrite=overwrite, status=say) as dest:
        return _place(model, dest, scheme, blocks, options, from_config, data, tokenizer, calib_sequences,
                      eval_sequences, seq_len, seed, calibrate, say)


def _place(model: str, dest, scheme: str | None, blocks: str | None, options: dict | None, from_config: bool,
           data: str | None, tokenizer: str | None, calib_sequences: int, eval_sequences: int, seq_len: int,
           seed: int, calibrate: bool, say: Callable[[str], None]) -> dict:
    if (scheme is None) == (blocks is None):
        raise UsageError("give exactly one of --scheme or --blocks")
    if scheme is not None and scheme not in SCHEMES:
        raise UsageError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    options = dict(options or {})
    alpha0 = float(options.get("alpha0", 0.5))
    if from_config:
        net, source_cfg, folder = model_from_config(model, seed)
        ref_path = folder
    else:
        from normsurgeon.io.loader import load_model

        lm = load_model(model)
        net, source_cfg, ref_path = lm.model, dict(lm.config), lm.path
        if lm.converted is not None:
            raise UsageError("MODEL is already a normsurgeon output; place from the original model")
    anatomy = find_anatomy(net)
    L = len(anatomy.blocks)
    try:
        spec = parse_block_spec(blocks, L) if blocks else build_spec(scheme, L, options)
    except (TypeError, ValueError) as e:  # pydantic: unknown or invalid scheme options
        raise UsageError(f"invalid options for scheme {scheme!r}: {str(e).splitlines()[0]}") from None
    from normsurgeon.placement.runtime import check

    check(anatomy, spec)  # a structure the spec cannot apply to is refused before any data is read
    calib = evals = None
    data_desc: dict = {}
    if not from_config:
        if data is None:
            raise UsageError("converting a checkpoint needs --data (calibration text) to set gains and report "
                             "the loss change")
        from normsurgeon.io.example_inputs import max_seq_len

        cap = max_seq_len(net)  # position tables with their offsets (OPT: 2)
        seq_len = min(seq_len, cap) if cap else seq_len
        calib, evals, data_desc = calibration_windows(data, net, ref_path, calib_sequences, eval_sequences,
                                                      seq_len, seed, tokenizer)
        vocab = getattr(net.config, "vocab_size", None)
        top = int(max(calib.max(), evals.max()))
        if vocab and top >= vocab:
            raise UsageError(f"--data has token id {top} but the model's vocabulary has {vocab} entries "
                             f"(tokenizer {data_desc.get('tokenizer', tokenizer) or 'default'}); pass a matching --tokenizer")
    source = copy.deepcopy(net) if not from_config else None
    say(f"placing {scheme or blocks} on {type(net).__name__} ({anatomy.summary()})")
    result = place(net, spec, mode="fresh" if from_config else "convert", calib_ids=calib,
                   calibrate_gains=calibrate, alpha0=alpha0, deepnorm_beta=options.get("init_beta"),
                   anatomy=anatomy)
    report: dict = {"model": model, "scheme": scheme or f"blocks:{blocks}", "mode": result.mode,
                    "family": result.family, "anatomy": result.anatomy, "blocks": [b.label for b in result.spec.blocks],
                    "embedding_norm": result.spec.embedding_norm, "preservation": result.preservation,
                    "notes": result.notes, "data": data_desc, "calibration_tokens": result.calibration_tokens}
    if source is not None:
        report["evaluation"] = compare(source, net, evals)
        say(f"loss {report['evaluation']['loss_before']:.4f} -> {report['evaluation']['loss_after']:.4f} "
            f"({report['evaluation']['delta_loss']:+.4f}) on {eval_sequences} held-out windows")
    else:
        report["evaluation"] = None
        report["notes"].append("from config: fresh random initialisation, no source function to compare")
    if dest is not None:
        from normsurgeon.io.writer import copy_tagalong_files
        from normsurgeon.placement.io import write_placed

        out = dest.path
        with dest.staging() as tmp:
            report["output"] = write_placed(net, tmp, source_cfg, result.family, result.spec, alpha0,
                                            evals[:2] if evals is not None else None)
            report["output"]["tagalong"] = copy_tagalong_files(ref_path if not from_config else None, tmp)
            (tmp / "placement_report.json").write_text(json.dumps(report, indent=2, default=str))
            (tmp / "placement_report.md").write_text(to_markdown(report))
        report["out"] = str(out)
    report["model_object"] = net
    return report


def to_markdown(r: dict) -> str:
    lines = [f"# Placement: {r['scheme']} ({r['mode']})", "", f"- model: `{r['model']}` ({r['family']}: {r.get('anatomy', '')})",
             f"- blocks: {', '.join(r['blocks'])}", f"- preserves: **{r['preservation']['level']}**"]
    lines += [f"  - {k}: {v}" for k, v in r["preservation"]["reasons"].items()]
    ev = r.get("evaluation")
    if ev:
        lines += [f"- loss on {ev['windows'][0]} held-out windows of {ev['windows'][1]} tokens: "
                  f"{ev['loss_before']:.4f} -> {ev['loss_after']:.4f} (Δ {ev['delta_loss']:+.4g} nats/token)",
                  f"- max |Δlogit| {ev['max_abs_logit_diff']:.3g}, max |Δlog-prob| {ev['max_abs_logprob_diff']:.3g}, "
                  f"top-1 agreement {ev['top1_agreement']:.4f}"]
    out = r.get("output") or {}
    if out:
        lines.append(f"- written as: {out.get('class')} ({'stock transformers' if out.get('stock') else 'load with normsurgeon.placement.io.load_placed'})")
    lines += [f"- note: {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"
