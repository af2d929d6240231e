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


def builtin_windows(model, folder, n_calib: int, n_eval: int, seq_len: int, seed: int,
                    tokenizer: str | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Calibration and evaluation windows when no ``--data`` is given: the built-in sample text that
    ``verify`` uses (``verification/inputs.py``), tokenized like ``--data`` would be; both sets of windows
    come from that one short text. A model whose tokenizer cannot encode it (no tokenizer files and a
    vocabulary that is not bytes) gets seeded random token ids instead."""
    from normsurgeon.errors import NormSurgeonError
    from normsurgeon.train.data import tokenizer_for
    from normsurgeon.verification.inputs import BUILTIN_TEXT

    vocab = getattr(model.config, "vocab_size", None)
    ids, why = None, None
    try:
        tok = tokenizer_for(folder, vocab, tokenizer)
        ids = torch.tensor(tok.encode(BUILTIN_TEXT), dtype=torch.long)
        if vocab and ids.numel() and int(ids.max()) >= vocab:
            ids, why = None, f"its token ids exceed the vocabulary ({vocab})"
    except NormSurgeonError as e:
        why = str(e)
    if ids is not None and ids.numel() >= 2:
        seq = min(seq_len, ids.numel())
        desc = {"source": "built-in sample text (no --data)", "tokenizer": tok.name, "tokens": int(ids.numel()),
                "split": "calibration and evaluation windows from the same text"}
        return _spread(ids, n_calib, seq), _spread(ids, n_eval, seq), desc
    gen = torch.Generator().manual_seed(seed)
    top = vocab or 2
    desc = {"source": "seeded random token ids (no --data; the built-in text cannot be tokenized: "
                      f"{why or 'too short'})", "tokenizer": None}
    return (torch.randint(0, top, (n_calib, seq_len), generator=gen),
            torch.randint(0, top, (n_eval, seq_len), generator=gen), desc)


def _spread(ids: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """``n`` windows of ``seq`` tokens with evenly spaced starts (overlapping when the text is short)."""
    last = ids.numel() - seq
    starts = sorted({round(i * last / max(1, n - 1)) for i in range(n)}) if n > 1 else [0]
    return torch.stack([ids[s:s + seq] for s in starts])


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
        from normsurgeon.io.example_inputs import max_seq_len

        cap = max_seq_len(net)  # position tables with their offsets (OPT: 2)
        seq_len = min(seq_len, cap) if cap else seq_len
        if data is None:  # like verify: the built-in sample text
            calib, evals, data_desc = builtin_windows(net, ref_path, calib_sequences, eval_sequences, seq_len, seed,
                                                      tokenizer)
            say(f"no --data: calibrating and evaluating on {data_desc['source']}")
        else:
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
    if data is None and not from_config:
        report["notes"].append(f"no --data: gains calibrated and the loss change measured on {data_desc['source']} "
                               f"({calib.shape[0]} and {evals.shape[0]} windows of {calib.shape[1]} tokens, not held "
                               "out): a rough check; pass --data for a held-out measurement")
    if source is not None:
        report["evaluation"] = compare(source, net, evals)
        held = "held-out " if data is not None else ""
        say(f"loss {report['evaluation']['loss_before']:.4f} -> {report['evaluation']['loss_after']:.4f} "
            f"({report['evaluation']['delta_loss']:+.4f}) on {evals.shape[0]} {held}windows")
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
            settings = {"scheme": scheme, "blocks": blocks, "options": options, "from_config": from_config,
                        "data": data, "tokenizer": tokenizer, "calib_sequences": calib_sequences,
                        "eval_sequences": eval_sequences, "seq_len": seq_len, "seed": seed, "calibrate": calibrate}
            write_settings(tmp, model, settings, result.spec, data_desc)
            (tmp / "placement_report.json").write_text(json.dumps(report, indent=2, default=str))
            (tmp / "placement_report.md").write_text(to_markdown(report))
            _write_card(tmp, model, ref_path, report, str(out))
        report["out"] = str(out)
    report["model_object"] = net
    return report


SETTINGS = "normsurgeon_recipe.yaml"  # the name convert uses for its resolved recipe and plan


def write_settings(folder: Path, model: str, settings: dict, spec, data_desc: dict) -> None:
    """The resolved settings (seq_len after the model's cap, the data used) and the resolved per-block
    placement spec beside the weights, as ``convert`` writes its resolved recipe."""
    import yaml

    from normsurgeon.version import __version__

    doc = {"command": "place", "normsurgeon_version": __version__, "source": model, "settings": settings,
           "data": data_desc, "spec": spec.model_dump(mode="json")}
    doc = json.loads(json.dumps(doc, default=str))  # plain YAML types only
    (folder / SETTINGS).write_text(yaml.safe_dump(doc, sort_keys=False))


def _write_card(tmp: Path, model: str, ref_path, report: dict, out: str) -> None:
    from normsurgeon.io.model_card import write_model_card

    o = report["output"]
    ev = report.get("evaluation") or {}
    done = [f"norm placement rewritten to `{report['scheme']}` ({report['mode']}): blocks "
            f"{', '.join(dict.fromkeys(report['blocks']))} on {report['family']}"
            + (", with an embedding norm" if report.get("embedding_norm") else ""),
            f"function preserved: {report['preservation']['level']}"
            + (f"; gains calibrated on {report['calibration_tokens']} tokens" if report.get("calibration_tokens") else "")]
    if ev:
        done.append(f"{_loss_label(report)} change {ev.get('delta_loss', 0):+.4g} nats/token")
    done.append(f"written as {o.get('class')}" + (" (stock transformers class)" if o.get("stock") else
                                                   " (normsurgeon's placed structure)"))
    notes = [] if o.get("stock") else [
        f"`normsurgeon.placement.io.load_placed({json.dumps(out)}).model` does the same; the folder also works as "
        "MODEL in `normsurgeon diagnose`"]
    write_model_card(tmp, model, ref_path, "place", report, bool(o.get("stock")), done, output_path=out,
                     loading_notes=notes)


def _loss_label(report: dict) -> str:
    source = str((report.get("data") or {}).get("source", ""))
    return "loss on the built-in sample text" if source.startswith(("built-in", "seeded")) else "held-out loss"


def to_markdown(r: dict) -> str:
    lines = [f"# Placement: {r['scheme']} ({r['mode']})", "", f"- model: `{r['model']}` ({r['family']}: {r.get('anatomy', '')})",
             f"- blocks: {', '.join(r['blocks'])}", f"- preserves: **{r['preservation']['level']}**"]
    lines += [f"  - {k}: {v}" for k, v in r["preservation"]["reasons"].items()]
    ev = r.get("evaluation")
    if ev:
        where = "held-out windows" if _loss_label(r) == "held-out loss" else "windows of the built-in text"
        lines += [f"- loss on {ev['windows'][0]} {where} of {ev['windows'][1]} tokens: "
                  f"{ev['loss_before']:.4f} -> {ev['loss_after']:.4f} (Δ {ev['delta_loss']:+.4g} nats/token)",
                  f"- max |Δlogit| {ev['max_abs_logit_diff']:.3g}, max |Δlog-prob| {ev['max_abs_logprob_diff']:.3g}, "
                  f"top-1 agreement {ev['top1_agreement']:.4f}"]
    out = r.get("output") or {}
    if out:
        lines.append(f"- written as: {out.get('class')} ({'stock transformers' if out.get('stock') else 'load with normsurgeon.placement.io.load_placed'})")
    lines += [f"- note: {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"
