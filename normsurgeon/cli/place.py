"""The ``place`` command (added to ``normsurgeon.cli``'s app by ``register(app)``); a thin layer over
``normsurgeon.placement.run.run_place``.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
>>> [c.name for c in app.registered_commands]
['place']
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from normsurgeon.cli.console import out_console, status
from normsurgeon.cli.exits import run_command
from normsurgeon.cli.options import JsonOpt, OverwriteOpt, QuietOpt, SeqLenHelp, VerboseOpt, choice
from normsurgeon.cli.output import emit, show_report
from normsurgeon.errors import UsageError

_QK = {"keep": "keep", "on": "qk", "off": "none", "qkv": "qkv"}
_SCHEMES = ("pre", "post", "peri", "output-only", "mix", "lns", "deepnorm", "hybridnorm", "qk-norm", "dyt")


def _options(scheme: Optional[str], alpha: Optional[float], star: bool, qk_norm: str, embedding_norm: bool,
             calibrate: bool, alpha0: float, residual_alpha: Optional[float]) -> dict:
    if qk_norm not in _QK:
        raise UsageError(f"--qk-norm must be one of {', '.join(_QK)}, not {qk_norm!r}")
    opts: dict = {}
    if qk_norm != "keep" or scheme == "qk-norm":
        opts["qk"] = _QK[qk_norm] if qk_norm != "keep" else "qk"
    if alpha is not None:
        if scheme != "mix":
            raise UsageError("--alpha applies to --scheme mix")
        opts["alpha"] = alpha
    if star:
        if scheme != "hybridnorm":
            raise UsageError("--star applies to --scheme hybridnorm")
        opts["star"] = True
    if embedding_norm:
        if scheme != "peri":
            raise UsageError("--embedding-norm applies to --scheme peri")
        opts["embedding_norm"] = True
    if scheme in ("peri", "output-only", "dyt"):
        opts["calibrate"] = calibrate
    if scheme == "dyt":
        opts["alpha0"] = alpha0
    if residual_alpha is not None:
        if scheme != "deepnorm":
            raise UsageError("--residual-alpha applies to --scheme deepnorm")
        opts["residual_alpha"] = residual_alpha
    return opts


def register(app: typer.Typer) -> None:
    """Add ``place`` to ``app``."""

    @app.command("place", short_help="Move a decoder's norms to another placement and report what it preserves.")
    def place_cmd(
        model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint (folder, cached hub id, factory) or, "
                                    "with --from-config, a config.json or a folder holding one."),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (written atomically)."),
        scheme: Optional[str] = choice(None, _SCHEMES, "--scheme", help="The placement to rewrite to (docs/placement.md)."),
        blocks: Optional[str] = typer.Option(None, "--blocks", help="Per-block spec instead of --scheme, e.g. "
                                             "'post@0:2,pre+lns@2:' (mods: lns, qk, qkv, noqk, dyt)."),
        from_config: bool = typer.Option(False, "--from-config", help="Build a fresh model from MODEL's config "
                                         "(training from scratch; scheme init such as DeepNorm beta)."),
        data: Optional[str] = typer.Option(None, "--data", help="Calibration/evaluation text (file, folder, .jsonl, "
                                           "saved dataset or package.module:function); without it a built-in "
                                           "calibration text is used."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="'bytes' or a tokenizer folder."),
        alpha: Optional[float] = typer.Option(None, "--alpha", help="mix: fraction of Post-LN blocks (default 0.25)."),
        star: bool = typer.Option(False, "--star", help="hybridnorm: HybridNorm* (block 0 fully Pre-Norm)."),
        qk_norm: str = choice("keep", tuple(_QK), "--qk-norm", help="QK-norm: keep, on, off or qkv (composes with any "
                              "scheme)."),
        embedding_norm: bool = typer.Option(False, "--embedding-norm", help="peri: add a norm on the embeddings."),
        calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Set added gains from calibration data."),
        alpha0: float = typer.Option(0.5, "--alpha0", help="dyt: initial alpha for --from-config."),
        residual_alpha: Optional[float] = typer.Option(None, "--residual-alpha", help="deepnorm: default (2L)^(1/4)."),
        calib_seqs: int = typer.Option(16, "--calib-seqs", help="Calibration windows (train split)."),
        eval_seqs: int = typer.Option(16, "--eval-seqs", help="Evaluation windows (held-out split)."),
        seq_len: int = typer.Option(128, "--seq-len", help=SeqLenHelp + "."),
        seed: int = typer.Option(0, "--seed", help="Seed of the windows (and of the init with --from-config)."),
        overwrite: bool = OverwriteOpt,
        dry_run: bool = typer.Option(False, "--dry-run", help="Rewrite and measure in memory; write nothing."),
        as_json: bool = JsonOpt,
        quiet: bool = QuietOpt,
        verbose: bool = VerboseOpt,
    ) -> None:
        """Rewrite a Pre-LN / Pre-RMSNorm decoder (sequential or parallel blocks, separate or fused q/k/v, read from
        its traced dataflow) to another norm placement and report what it preserves.

        exact: lns (1/sqrt(l) folded into the input-norm gains), pre. approximate after calibration: peri,
        output norms and dyt (gains / alpha from calibration data). not function-preserving: post, mix,
        deepnorm, hybridnorm, qk-norm. The loss change on held-out windows of --data is always reported.

        \b
        Example:
          normsurgeon place examples/tiny-gpt2 --scheme lns \\
              --data examples.stdlib_corpus:load_stdlib_corpus -o out/lns
        """
        def go() -> int:
            from normsurgeon.placement.run import run_place

            if out is None and not dry_run:
                raise UsageError("give -o OUT (or --dry-run)")
            opts = _options(scheme, alpha, star, qk_norm, embedding_norm, calibrate, alpha0, residual_alpha)
            if blocks is not None and opts:
                raise UsageError("scheme options (--alpha, --qk-norm, ...) apply to --scheme, not --blocks")
            r = run_place(model, out, scheme=scheme, blocks=blocks, options=opts, from_config=from_config, data=data,
                          tokenizer=tokenizer, calib_sequences=calib_seqs, eval_sequences=eval_seqs, seq_len=seq_len,
                          seed=seed, calibrate=calibrate, overwrite=overwrite, dry_run=dry_run,
                          say=status(not as_json))
            r.pop("model_object", None)
            if as_json:
                emit(r, "place")
            else:
                from normsurgeon.placement.run import to_markdown

                show_report(out_console, None if dry_run else out, ("placement_report.md",), to_markdown(r))
                if not dry_run:
                    out_console.print(f"wrote {out}", highlight=False)
            return 0

        run_command(go)
