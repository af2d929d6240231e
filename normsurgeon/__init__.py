"""normsurgeon: surgery on the normalization layers of PyTorch and Hugging Face models.

The public surface is small; every CLI command is one of these functions::

    import normsurgeon
    nm = normsurgeon.inspect_model("path/to/model")          # the norm map
    report = normsurgeon.convert("path/to/model", "out", to="rmsnorm")
    report = normsurgeon.verify("path/to/model", "out")
    model = normsurgeon.load("out").model                    # RMSNorm modules in place
"""
from __future__ import annotations

from normsurgeon.version import __version__

__all__ = ["__version__", "convert", "verify", "inspect_model", "load"]


def __getattr__(name: str):  # lazy: importing normsurgeon must not import transformers
    if name == "convert":
        from normsurgeon.conversion import convert
        return convert
    if name == "verify":
        from normsurgeon.verification.api import verify
        return verify
    if name == "inspect_model":
        from normsurgeon.inspect import inspect_model
        return inspect_model
    if name == "load":
        from normsurgeon.io.loader import load_model
        return load_model
    raise AttributeError(name)
