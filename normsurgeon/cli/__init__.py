"""The ``normsurgeon`` command line: a thin layer over the library functions.

Each command calls one typed library function, prints a human rendering (or ``--json``), and turns
``NormSurgeonError`` subclasses into a one-line message and a documented exit code.

- ``application``: the Typer ``app``, its commands in order, and ``main`` (the console script, also
  ``python -m normsurgeon.cli``);
- one module per command, each with ``register(app)``: ``inspect``, ``convert``, ``verify``, ``recipes``,
  ``fold_bn``, ``remove_ln``, ``place``, ``diagnose``, ``plan``, ``prepbn``; ``streaming`` holds the
  memory-bounded paths of ``convert``, ``verify`` and ``plan``;
- shared: ``options`` (option declarations: one name per idea, choices, dtype aliases, deprecated
  spellings, the exit-code epilog), ``console`` (stdout / stderr, the ``error:`` line, ``-q`` / ``-v``),
  ``exits`` (failures to exit codes), ``output`` (``--json`` documents and their ``schema`` ids, rendered
  reports), ``progress`` (bars on a terminal, timestamped lines elsewhere), ``device`` (``--device``),
  ``training`` (what ``remove-ln`` and ``prepbn`` share), ``click_compat`` (the click typer runs on).
"""
from normsurgeon.cli.application import app, main

__all__ = ["app", "main"]
