"""Typer options that several commands share: one declaration and one help text each.

>>> import typer
>>> isinstance(AllowPickle, typer.models.OptionInfo)
True
"""
from __future__ import annotations

import typer

ModelArg = typer.Argument(..., metavar="MODEL", help="Local folder, cached hub id, or package.module:factory.")
AllowPickle = typer.Option(False, "--allow-pickle", help="Allow pickle checkpoints (loaded with weights_only=True).")
TrustRemote = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code from its folder.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout instead of tables.")
ReportJsonOpt = typer.Option(False, "--json", help="Print the report as JSON on stdout.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace OUT if it exists.")
