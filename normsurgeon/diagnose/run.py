"""``run_diagnose``: load a model and data, diagnose, and write report.json, PNG plots, report.md and
report.html into an output folder (atomically).

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "diag"
>>> text = pathlib.Path(tempfile.mkdtemp()) / "t.txt"; _ = text.write_text("A = B + 1\\nC = (A, 2)\\n" * 40)  # bytes < 96
>>> r = run_diagnose("normsurgeon.testing:tiny_gpt2", str(text), out, num_sequences=2, seq_len=16,
...                  tokenizer="bytes", plots=False)
>>> sorted(p.name for p in out.iterdir())
['report.html', 'report.json', 'report.md']
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

from normsurgeon.diagnose.compute import diagnose_model
from normsurgeon.diagnose.report import to_html, to_markdown
from normsurgeon.diagnose.spikes import log_spikes
from normsurgeon.errors import UsageError


def load_any(ref: str, allow_pickle: bool = False, trust_remote_code: bool = False):
    """``load_model``, or normsurgeon's placement loader for folders written by ``place``."""
    from normsurgeon.placement.io import is_placed_folder, load_placed
    from normsurgeon.io.loader import load_model

    if is_placed_folder(ref):
        return load_placed(ref)
    return load_model(ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest token window the model takes (``None``: no limit found): ``max_seq_len`` of
    io/example_inputs.py (position tables with their offsets and the config's length keys, MPT's
    ``max_seq_len`` included), or None for a module that is not a Hugging Face model.

    >>> import transformers as T
    >>> max_positions(T.MptForCausalLM(T.MptConfig(d_model=16, n_heads=2, n_layers=1, max_seq_len=24, vocab_size=32)))
    24
    """
    from normsurgeon.io.example_inputs import max_seq_len

    if getattr(model, "config", None) is None:
        return None
    try:
        return max_seq_len(model)
    except AttributeError:  # not a Hugging Face model (no main_input_name)
        return None


def token_windows(data: str, model: torch.nn.Module, folder: Path | None, num: int, seq_len: int, seed: int,
                  tokenizer: str | None = None, text_field: str = "text") -> tuple[torch.Tensor, dict]:
    """``num`` fixed windows [num, seq_len] from the held-out split of ``data`` (train split if too short)."""
    from normsurgeon.train.data import check_vocabulary, heldout_windows, load_token_data, tokenizer_for

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    tok = tokenizer_for(folder, vocab, tokenizer)
    td = load_token_data(data, tok, text_field)
    tokens, split = (td.heldout, "heldout") if td.heldout.numel() >= seq_len else (td.train, "train")
    if tokens.numel() < seq_len:
        raise UsageError(f"the data has {tokens.numel()} tokens, fewer than one window of {seq_len}; use --seq-len")
    check_vocabulary([tokens], vocab, tok)
    return heldout_windows(tokens, num, seq_len, seed), {**td.description, "windows_from": split}


def run_diagnose(model: str, data: str, out: Path | None, *, num_sequences: int = 8, seq_len: int = 512,
                 seed: int = 1234, log: str | None = None, micro_batch: int = 2, grads: bool = True,
                 removal: bool = True, removal_sequences: int | None = None,
                 grad_sequences: int | None = None, tokenizer: str | None = None,
                 text_field: str = "text", plots: bool = True, overwrite: bool = False,
                 allow_pickle: bool = False, trust_remote_code: bool = False,
                 say: Callable[[str], None] | None = None, progress: Callable[..., None] | None = None) -> dict:
    """Diagnose ``model`` on ``data``; write the report into ``out`` (if given); return it as a dict.

    ``progress(label, done, total, unit=...)``: the counted passes (``stats pass``: sequences, ``layer
    removal``: layers) go there instead of to ``say``."""
    from normsurgeon.io.destination import maybe_claim_output

    say = say or (lambda msg: None)
    if num_sequences < 1 or seq_len < 2 or micro_batch < 1:
        raise UsageError("--num-seqs and --micro-batch must be >= 1 and --seq-len >= 2")
    with maybe_claim_output(None if out is None else Path(out), inputs=[model, data, log], overwrite=overwrite,
                            status=say) as dest:
        return _diagnose(model, data, dest, num_sequences, seq_len, seed, log, micro_batch, grads, removal,
                         removal_sequences, grad_sequences, tokenizer, text_field, plots, allow_pickle,
                         trust_remote_code, say, progress)


def _diagnose(model: str, data: str, dest, num_sequences: int, seq_len: int, seed: int, log: str | None,
              micro_batch: int, grads: bool, removal: bool, removal_sequences: int | None,
              grad_sequences: int | None, tokenizer: str | None, text_field: str, plots: bool,
              allow_pickle: bool, trust_remote_code: bool, say: Callable[[str], None],
              progress: Callable[..., None] | None = None) -> dict:
    lm = load_any(model, allow_pickle, trust_remote_code)
    net = lm.model.float() if lm.dtype in (torch.float16, torch.bfloat16) else lm.model
    cap = max_positions(net)
    if cap is not None and seq_len > cap:
        say(f"--seq-len {seq_len} exceeds the model's {cap} positions; using {cap}")
        seq_len = cap
    spikes = log_spikes(log) if log else None  # read the log first: a bad path fails before the long pass
    ids, data_desc = token_windows(data, net, lm.path, num_sequences, seq_len, seed, tokenizer, text_field)
    say(f"diagnosing {type(net).__name__} on {ids.shape[0]} x {ids.shape[1]} tokens")
    d = diagnose_model(net, ids, micro_batch=micro_batch, grads=grads, removal=removal,
                       removal_sequences=removal_sequences, grad_sequences=grad_sequences,
                       say=counted_as_progress(say, progress))
    d.spikes = spikes
    report = {"model": model, "data": data_desc, "seed": seed, **d.to_dict()}
    if dest is not None:
        out = dest.path
        with dest.staging() as tmp:
            written, note = [], None
            if plots:
                from normsurgeon.diagnose.plots import write_plots

                written, note = write_plots(d, tmp, title=f"{model}")
            report["plots"] = written
            if note:
                report["plots_note"] = note
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
            (tmp / "report.md").write_text(to_markdown(report, written, model))
            (tmp / "report.html").write_text(to_html(report, written, model, folder=tmp))  # plots embedded
        report["out"] = str(out)
    return report


_COUNTED = re.compile(r"^(?P<label>[\w ]+): (?P<done>\d+)/(?P<total>\d+)(?: (?P<unit>\w+?)s?)?$")


def counted_as_progress(say: Callable[[str], None], progress: Callable[..., None] | None) -> Callable[[str], None]:
    """``say``, except that a counted status of ``diagnose_model`` (``stats pass: 4/8 sequences``) goes to
    ``progress(label, done, total, unit=)`` when there is one.

    >>> seen = []
    >>> s = counted_as_progress(seen.append, lambda *a, **k: seen.append((a, k)))
    >>> s("stats pass: 4/8 sequences"); s("layer removal: 1/2"); s("hello")
    >>> seen
    [(('stats pass', 4, 8), {'unit': 'sequence'}), (('layer removal', 1, 2), {'unit': 'layer'}), 'hello']
    """
    if progress is None:
        return say

    def both(msg: str) -> None:
        m = _COUNTED.match(msg)
        if m is None:
            say(msg)
            return
        unit = m["unit"] or ("layer" if "layer" in m["label"] else "")
        progress(m["label"], int(m["done"]), int(m["total"]), unit=unit)
    return both
