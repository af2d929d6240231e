"""Errors with documented exit codes.

Every failure a user can cause maps to one subclass, and the CLI turns it into a one-line message and
the subclass's exit code (see ``EXIT_CODES`` and the README's table).

>>> from normsurgeon.errors import InputError
>>> InputError("no such folder: x").exit_code
5
"""
from __future__ import annotations


class NormSurgeonError(Exception):
    """Base class: a problem that is reported to the user as one line.

    ``details``: anything JSON-serialisable that explains it further (a failed verification's whole
    report); the CLI prints it with ``--json`` and never on stderr.
    """

    exit_code = 1

    def __init__(self, message: str = "", details: object = None):
        super().__init__(message)
        self.details = details


class UsageError(NormSurgeonError):
    """Bad flags, an invalid recipe, or an output folder that already exists."""

    exit_code = 2


class VerificationFailed(NormSurgeonError):
    """The converted model's outputs are not equivalent to the source's within tolerance."""

    exit_code = 3


class UnsupportedModel(NormSurgeonError):
    """The model's structure does not allow the requested rewrite (the message says what and where)."""

    exit_code = 4


class InputError(NormSurgeonError):
    """Missing or corrupt input: folder, safetensors, config/weights mismatch, pickle refused, cache miss."""

    exit_code = 5


class ResourceError(NormSurgeonError):
    """A resource limit (memory, disk) would be exceeded."""

    exit_code = 6


class TrainingDiverged(NormSurgeonError):
    """The loss or the gradient became NaN/inf during fine-tuning; the last good checkpoint is kept."""

    exit_code = 7


EXIT_CODES = {
    0: "success (and verification passed, where it ran)",
    1: "internal error (set NORMSURGEON_DEBUG=1 for a traceback)",
    2: "usage error: bad option, invalid recipe, output exists without --overwrite",
    3: "verification failed: outputs differ beyond the tolerance for the dtype",
    4: "unsupported model or structure: the rewrite cannot be done exactly (message says where)",
    5: "input problem: missing/corrupt files, config/weights mismatch, pickle refused, not in cache",
    6: "resource limit exceeded",
    7: "fine-tuning diverged (NaN loss); the last good checkpoint is kept",
}
