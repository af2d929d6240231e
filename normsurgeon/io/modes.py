"""File modes of an output: what a plain ``open`` / ``mkdir`` would give under the process's umask.

Libraries that write through a private temporary file (safetensors' ``save_file``, ``tempfile``) leave
0600 files and 0700 folders; ``apply_umask`` gives a finished output folder the modes the user expects
(0644 / 0755 with the usual umask 022), before it is moved into place (``destination.replace_folder``).
"""
from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the OS says it (Linux ``/proc``), else by
    setting and restoring it.

    >>> 0 <= current_umask() <= 0o777
    True
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give every file and folder below ``folder`` (itself included) the mode a plain ``open``/``mkdir``
    gives under the umask (0644 / 0755 typically). Libraries that write through a private temporary file
    (safetensors, ``tempfile``) leave 0600 / 0700, which other users of a shared model folder cannot read.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); f = d / "w.bin"; _ = f.write_bytes(b"x"); f.chmod(0o600)
    >>> apply_umask(d); oct(f.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    True
    """
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    for root, dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, file_mode | (os.stat(p).st_mode & 0o111 & ~mask))  # keep execute bits
        for name in dirs:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, dir_mode)
    os.chmod(folder, dir_mode)
