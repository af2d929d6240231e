"""The ``normsurgeon`` command line: a thin layer over the library functions.

Each command calls one typed library function, prints a human rendering (or ``--json``), and turns
``NormSurgeonError`` subclasses into a one-line message and a documented exit code.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from normsurgeon import __version__, cli_click
from normsurgeon.cli_options import AllowPickle, JsonOpt, ModelArg, TrustRemote
from normsurgeon.errors import EXIT_CODES, NormSurgeonError

_EPILOG = "Exit codes: " + "; ".join(f"{k} {v.split(':')[0]}" for k, v in EXIT_CODES.items()) + "."

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Surgery on the normalization layers of PyTorch and Hugging Face models.\n\n"
                       "MODEL is a local Hugging Face folder, a hub id already in the local cache "
                       "(offline), or a factory `package.module:function` returning a torch module.",
                  epilog=_EPILOG)
out_console = Console()
err_console = Console(stderr=True)


ERROR_SCHEMA = "normsurgeon.error/1"
_OUTPUT_PARAMS = ("out", "checkpoint_dir")
_JSON_PARAMS = ("json_out", "as_json")


def _command_params() -> dict:
    ctx = cli_click.get_current_context(silent=True)
    return dict(ctx.params) if ctx is not None else {}


def _run(fn: Callable[[], int | None]) -> None:
    """Call ``fn``; map errors to one line on stderr and the documented exit code.

    The command's own parameters say where its outputs are (``out``, ``checkpoint_dir``: an OSError
    there is exit 2, elsewhere exit 5, a full disk exit 6) and whether ``--json`` was given (then the
    error is also printed on stdout as a ``normsurgeon.error/1`` object, with its details).
    """
    params = _command_params()
    outputs = [params.get(k) for k in _OUTPUT_PARAMS if params.get(k) is not None]
    as_json = any(params.get(k) for k in _JSON_PARAMS)
    try:
        code = fn() or 0
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        _fail(130, "interrupted", "Interrupted", None, as_json)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and a documented exit code
        if os.environ.get("NORMSURGEON_DEBUG"):
            raise
        if isinstance(e, OSError):
            from normsurgeon.io.destination import user_error_for

            e = user_error_for(e, outputs)
        if isinstance(e, NormSurgeonError):
            _fail(e.exit_code, str(e), type(e).__name__, e.details, as_json)
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(1, f"internal error: {type(e).__name__}: {text} (set NORMSURGEON_DEBUG=1 for a traceback)",
              type(e).__name__, None, as_json)
    raise typer.Exit(code)


_MAX_LINE = 400


def say_error(message: str) -> str:
    """Print ``message`` as one ``error:`` line on stderr (whitespace folded, at most about 400
    characters); return the line."""
    line = " ".join(message.split())
    if len(line) > _MAX_LINE:
        line = line[: _MAX_LINE - 1] + "…"
    prefix = "" if line.startswith("internal error") else "error: "
    err_console.print(f"[bold red]{prefix}[/]{escape(line)}", highlight=False, soft_wrap=True)
    return line


def _fail(code: int, message: str, kind: str, details: object, as_json: bool) -> None:
    """One line on stderr (and, with --json, an error object on stdout with the whole message); exit ``code``."""
    line = say_error(message or kind)
    if details is None and line != " ".join(message.split()):
        details = {"message": message}
    if as_json:
        print(json.dumps({"schema": ERROR_SCHEMA, "status": "error", "exit_code": code, "error": kind,
                          "message": line, "details": details}, indent=2, default=str))
    raise typer.Exit(code)


def verification_exit(report: dict) -> int:
    """0 for a passed verification; else one ``error:`` line naming what failed and where, and exit 3."""
    if report["status"] == "pass":
        return 0
    from normsurgeon.verification.report import failure_line

    say_error(f"verification failed: {failure_line(report)}")
    return 3


def _status(enabled: bool):
    def say(msg: str) -> None:
        if enabled:
            err_console.print(f"[dim]· {escape(msg)}[/]", highlight=False, soft_wrap=True)
    return say


def _version(value: bool) -> None:
    if value:
        out_console.print(f"normsurgeon {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@app.command(epilog=_EPILOG)
def inspect(model: str = ModelArg, json_out: bool = JsonOpt, allow_pickle: bool = AllowPickle,
            trust_remote_code: bool = TrustRemote) -> None:
    """Show every norm, its role, readers and writers, each block's placement, and which recipes apply.

    Roles: pre (reads the residual before a block), final (reads it before the heads), post (the norm's
    output is the residual: Post-LN), output (normalizes a sublayer output: Peri-LN), embedding, inner
    (QK-norms and other norms off the residual stream, never touched).
    """
    def go() -> None:
        from normsurgeon.inspect import inspect_model

        info = inspect_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        if json_out:
            print(json.dumps(info, indent=2, default=str))
            return
        _print_inspect(info)
    _run(go)


def _print_inspect(info: dict) -> None:
    out_console.print(f"[bold]{info['architecture']}[/] ({info['dtype']}), hidden size {info['hidden_size']}, "
                      f"placement: [bold]{info['placement']}[/]")
    t = Table(title="norms")
    for col in ("norm", "class", "role", "eps", "readers"):
        t.add_column(col, overflow="fold")
    for n in info["norms"]:
        readers = ", ".join(r.rsplit(".", 1)[-1] for r in n["readers"]) or "—"
        t.add_row(n["name"], n["class"], n["role"], str(n["eps"]), readers)
    out_console.print(t)
    writers = ", ".join(f"{w['name']} ({w['kind']})" for w in info["writers"])
    out_console.print(f"[bold]residual writers[/] ({len(info['writers'])}): {writers}", highlight=False)
    placements: dict[str, int] = {}
    for b in info["blocks"]:
        placements[b["placement"]] = placements.get(b["placement"], 0) + 1
    out_console.print("[bold]blocks[/]: " + ", ".join(f"{k} x{v}" for k, v in placements.items()))
    for target, r in info["recipes"].items():
        if r["applies"]:
            out_console.print(f"[green]✓[/] convert --to {target}: exact")
        else:
            out_console.print(f"[red]✗[/] convert --to {target}: " + "; ".join(r["why_not"]), highlight=False)


@app.command(epilog=_EPILOG)
def convert(
    model: str = ModelArg,
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (must not exist unless --overwrite)."),
    to: str = typer.Option("rmsnorm", "--to", help="rmsnorm (Pre-RMSNorm) or crmsnorm (Pre-CRMSNorm, width d-1)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipe file or built-in name (overrides --to)."),
    dtype: str = typer.Option("source", "--dtype", help="Output dtype: source, float32, float64, bfloat16, float16."),
    bias_policy: Optional[str] = typer.Option(None, "--bias-policy",
                                              help="stock: keep shifts the stock class cannot hold on the norm "
                                                   "(loads in stock transformers); fold-all: create biases."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip verification of the written checkpoint."),
    text: Optional[Path] = typer.Option(None, "--text", help="Verify on this text file instead of built-in batches."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard, e.g. 2GB."),
    json_out: bool = JsonOpt,
    allow_pickle: bool = AllowPickle,
    trust_remote_code: bool = TrustRemote,
    # --- streaming (normsurgeon/cli_streaming.py, issue 6) ---
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan from config.json + safetensors headers only; write nothing."),
    stream: bool = typer.Option(False, "--stream", help="Convert group by group from disk (automatic when the "
                                                        "model does not fit in memory)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Refuse (exit 6) a plan needing more, e.g. 4GiB."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted streaming conversion."),
    verify_mode: str = typer.Option("auto", "--verify-mode", help="Streaming: auto, whole or layerwise."),
) -> None:
    """Convert a Pre-LN model to Pre-RMSNorm or Pre-CRMSNorm exactly, write it, and verify it.

    The residual writers are centred, each LayerNorm's gain and shift move into the layers that read it,
    and the norms become RMSNorm with the same epsilon (Jiang et al. 2023). Math in float64, cast once.
    Post-LN and other structures that cannot be converted exactly are refused (exit 4), nothing written.

    Example: normsurgeon convert examples/tiny-gpt2 --to rmsnorm -o out/tiny-gpt2-rms
    """
    def go() -> int:
        from normsurgeon import cli_streaming as cs
        from normsurgeon.errors import UsageError

        if to not in ("rmsnorm", "crmsnorm"):
            raise UsageError(f"--to must be rmsnorm or crmsnorm, not {to!r}")
        if bias_policy not in (None, "stock", "fold-all"):
            raise UsageError(f"--bias-policy must be stock or fold-all, not {bias_policy!r}")
        if dry_run or stream or resume or max_memory is not None or cs.should_stream(model):
            return cs.run_streaming_convert(
                model, out, to=to, recipe=recipe, bias_policy=bias_policy, dtype=dtype, overwrite=overwrite,
                no_verify=no_verify, max_shard_size=max_shard_size, max_memory=max_memory, resume=resume,
                dry_run=dry_run, verify_mode=verify_mode, json_out=json_out, console=out_console,
                status=_status(not json_out), streamed_for_memory=not (stream or resume or max_memory is not None))
        return convert_in_memory()

    def convert_in_memory() -> int:
        from normsurgeon.conversion import convert as do_convert
        from normsurgeon.verification.report import print_report

        report = do_convert(model, out, to=to, recipe=recipe, dtype=dtype, bias_policy=bias_policy,
                            overwrite=overwrite, run_verify=not no_verify, text_file=text,
                            max_shard_size=max_shard_size, allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code, status=_status(not json_out))
        if json_out:
            print(json.dumps(report, indent=2, default=str))
        else:
            print_report(report, out_console)
            for note in report["plan"]["notes"]:
                out_console.print(f"note: {note}", highlight=False)
            for norm, why in report["plan"]["kept_on_norm"].items():
                out_console.print(f"note: {norm} keeps its affine: {why}", highlight=False)
            load = "stock transformers or normsurgeon.load" if report["stock_loadable"] else "normsurgeon.load only"
            out_console.print(f"wrote {out} ({report['output']['format']}, {report['output']['dtype']}; "
                              f"loads with {load}); report: {out / 'equivalence_report.md'}", highlight=False)
        return 0
    _run(go)


@app.command(epilog=_EPILOG)
def verify(
    source: str = typer.Argument(..., help="The source model (as for MODEL)."),
    converted: str = typer.Argument(..., help="The converted folder."),
    text: Optional[Path] = typer.Option(None, "--text", help="Compare on this text file."),
    images: Optional[Path] = typer.Option(None, "--images", help="Compare on the images in this folder (vision models)."),
    stock: bool = typer.Option(False, "--stock", help="Load the converted folder with the plain Hugging Face class."),
    num: int = typer.Option(4, "--num", help="Number of sequences/images in the built-in batch."),
    seq_len: int = typer.Option(64, "--seq-len", help="Sequence length of the built-in batch."),
    seed: int = typer.Option(0, "--seed", help="Seed of the built-in batch."),
    json_out: bool = JsonOpt,
    allow_pickle: bool = AllowPickle,
    trust_remote_code: bool = TrustRemote,
    layerwise: bool = typer.Option(False, "--layerwise", help="Load one block of each model at a time (models "
                                                              "larger than memory); reports per-block errors."),
) -> None:
    """Check that CONVERTED computes the same function as SOURCE (exit 3 if not).

    Compares log-probabilities (shift-invariant), KL, top-1 agreement and, for information, raw logits,
    plus the residual stream at each converted norm's input to locate a bad fold. Thresholds depend on
    the converted checkpoint's dtype: float64 1e-10, float32 1e-4, float16 3e-2, bfloat16 1.5e-1.
    """
    if layerwise:  # --- streaming (normsurgeon/cli_streaming.py, issue 6) ---
        from normsurgeon import cli_streaming as cs

        _run(lambda: cs.run_layerwise_verify(source, converted, num=num, seq_len=seq_len, seed=seed, text=text,
                                             json_out=json_out, console=out_console))

    def go() -> int:
        from normsurgeon.verification.api import verify as do_verify
        from normsurgeon.verification.report import print_report

        report = do_verify(source, converted, stock=stock, num=num, seq_len=seq_len, seed=seed, text_file=text,
                           image_dir=images, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        if json_out:
            print(json.dumps(report, indent=2, default=str))
        else:
            print_report(report, out_console)
        return verification_exit(report)
    _run(go)


@app.command("recipes", epilog=_EPILOG)
def recipes_cmd(json_out: bool = JsonOpt) -> None:
    """List the built-in recipes."""
    def go() -> None:
        from normsurgeon.recipes import builtin_recipes, load_recipe

        rows = [load_recipe(name).model_dump() for name in builtin_recipes()]
        if json_out:
            print(json.dumps(rows, indent=2))
            return
        for r in rows:
            out_console.print(f"[bold]{r['name']}[/] ({r['target']}): {r['description'].strip()}", highlight=False)
    _run(go)


def _register_plugins() -> None:
    """Commands that live in their own modules register themselves here (absent modules are skipped)."""
    import importlib

    for mod in ("normsurgeon.cli_batchnorm", "normsurgeon.cli_lnremoval", "normsurgeon.cli_placement",
                "normsurgeon.cli_streaming", "normsurgeon.cli_prepbn"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # that command is not part of this build
                continue
            raise
        module.register(app)


_register_plugins()  # at the bottom: plugins may import helpers (_run, options) from this module


def main(argv: list[str] | None = None) -> int:
    """The console script: run the command; a usage error (unknown option, missing argument) is one line
    and exit 2, like every other error."""
    argv = sys.argv[1:] if argv is None else argv
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="normsurgeon", standalone_mode=False)
    except cli_click.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `normsurgeon` or `normsurgeon CMD`: the help
            print(e.format_message())
            return 2
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        _print_usage_error(e.format_message() + hint, "--json" in argv)
        return 2
    except cli_click.ClickException as e:
        _print_usage_error(e.format_message(), "--json" in argv)
        return e.exit_code
    except typer.Abort:
        err_console.print("[bold red]error:[/] interrupted", highlight=False)
        return 130
    return code if isinstance(code, int) else 0


def _print_usage_error(message: str, as_json: bool) -> None:
    line = say_error(message)
    if as_json:
        print(json.dumps({"schema": ERROR_SCHEMA, "status": "error", "exit_code": 2, "error": "UsageError",
                          "message": line, "details": None}, indent=2))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
