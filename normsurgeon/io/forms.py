"""The output-form registry: how ``normsurgeon.load`` loads each kind of normsurgeon output folder.

A normsurgeon output records its form in config.json's ``normsurgeon`` section (``"format": "fold-bn"``,
``"prepbn"``, ``"placement"``, ...). The recipe that writes a form also says how to load it, so the
loader (this layer) imports no recipe: a recipe package declares a *form loader* as an entry point of
the group ``normsurgeon.forms`` in pyproject.toml, named by the format::

    [project.entry-points."normsurgeon.forms"]
    fold-bn = "normsurgeon.batchnorm.deploy:load_form"

The entry point is imported the first time a folder of that format is loaded (``form_loader``), never
before; ``register_form`` registers one directly (tests, plugins outside this package). A form loader
takes a ``FormRequest`` and returns a ``normsurgeon.io.loader.LoadedModel``, or None to let the loader
read the folder the generic way (the stock class, plus the section's module swaps or rebuilt
structure: the ``pre-rmsnorm`` / ``pre-crmsnorm`` conversion outputs and every other format without a
form loader).

>>> seen = []
>>> register_form("example-form", lambda req: seen.append(req.section["format"]))
>>> form_loader("example-form")(FormRequest("ref", None, {"format": "example-form"}, stock=False))
>>> seen, form_loader("no-such-form") is None
(['example-form'], True)
>>> _FORMS.pop("example-form") is not None
True
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

GROUP = "normsurgeon.forms"


@dataclasses.dataclass(frozen=True)
class FormRequest:
    """What the loader knows when it hands a folder to a form loader."""

    ref: str  # what the user named (a folder, or a cached hub id resolved to ``path``)
    path: Path | None
    section: dict  # the folder's ``normsurgeon`` config section
    stock: bool  # load with the plain Hugging Face class, as a user without normsurgeon would
    allow_pickle: bool = False
    trust_remote_code: bool = False


FormLoader = Callable[[FormRequest], Any]  # -> LoadedModel | None

_FORMS: dict[str, FormLoader] = {}
_MISSING: set[str] = set()  # formats no entry point declares (looked up once)


def register_form(name: str, load: FormLoader) -> None:
    """Load folders whose section says ``"format": name`` with ``load``."""
    _FORMS[name] = load
    _MISSING.discard(name)


def form_loader(name: object) -> FormLoader | None:
    """The loader registered for format ``name`` (importing its entry point the first time), or None."""
    if not isinstance(name, str):
        return None
    if name not in _FORMS and name not in _MISSING:
        ep = _entry_points().get(name)
        if ep is None:
            _MISSING.add(name)
        else:
            _FORMS[name] = ep.load()
    return _FORMS.get(name)


def _entry_points() -> dict:
    """The group's entry points of every installed distribution, the first one on ``sys.path`` winning a
    name. Not ``entry_points(group=...)``: that reads one metadata folder per distribution name, and a
    stale ``normsurgeon.egg-info`` left in the working directory (which is on ``sys.path``) would hide
    the installed package's."""
    from importlib.metadata import distributions

    found: dict = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == GROUP:
                found.setdefault(ep.name, ep)
    if not found:
        raise RuntimeError(f"normsurgeon's output forms are not registered (no {GROUP!r} entry points): "
                           "install the package (`pip install -e .`, or `bash scripts/setup.sh`)")
    return found
