"""Claim an output folder safely: path rules, one writer at a time, stale staging, full disks.

Every command that writes (convert, fold-bn, prepbn, remove-ln, place, diagnose, the streaming
convert) goes through ``claim_output`` before any work:

- the output may not be an input, an ancestor of one, or inside one (real paths, symlinks resolved,
  including the symlinked files of an input folder such as a hub-cache snapshot's blobs);
- the output may not be a symbolic link or an existing non-folder;
- a lock file beside the destination (``.<name>.lock``, ``flock``) lets one process write it at a
  time; a second one fails at once (exit 2) naming the first one's pid;
- staging folders left by killed runs (``.<name>.partial-<pid>`` of a dead pid) are removed, and said;
- hidden names stay within the file system's name limit (a long output name is shortened + hashed);
- running out of disk while staging removes the staging folder and raises ``ResourceError`` (exit 6).

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> (root / "model").mkdir()
>>> with claim_output(root / "out", inputs=[root / "model"]) as dest:
...     with dest.staging() as tmp:
...         _ = (tmp / "config.json").write_text("{}")
>>> sorted(p.name for p in root.iterdir())
['model', 'out']
>>> try:
...     claim_output(root / "model" / "sub", inputs=[root / "model"]).__enter__()
... except Exception as e:
...     print(type(e).__name__, e.exit_code)
UsageError 2
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

from normsurgeon.errors import NormSurgeonError, ResourceError, UsageError
from normsurgeon.io.modes import apply_umask

NAME_MAX = 255
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_PID_SUFFIX = re.compile(r"-(\d+)$")


def hidden_stem(out: Path) -> str:
    """The part of the hidden sibling names (``.<stem>.partial-<pid>``) that stands for ``out``: its name,
    shortened with a hash when the longest sibling name would pass NAME_MAX bytes.

    >>> hidden_stem(Path("a/model"))
    'model'
    >>> len((".%s.partial-4194304" % hidden_stem(Path("x" * 250))).encode())  <= NAME_MAX
    True
    """
    name = out.name
    room = NAME_MAX - len(".") - len(".partial-4194304")
    raw = name.encode()
    if len(raw) <= room:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    keep = raw[: room - len(digest) - 1].decode(errors="ignore")
    return f"{keep}~{digest}"


def sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    """``.<stem>.<kind>[-<pid>]`` beside ``out``: staging (``partial``), lock, old copy."""
    suffix = f".{kind}" + (f"-{pid}" if pid is not None else "")
    return out.parent / f".{hidden_stem(out)}{suffix}"


def input_paths(refs: Iterable[str | Path | None]) -> list[Path]:
    """The local paths among ``refs`` (model folders, data files; factories and hub ids are skipped,
    except hub ids already in the local cache, which resolve to their snapshot folder)."""
    paths = []
    for ref in refs:
        if ref is None:
            continue
        p = Path(ref).expanduser()
        try:
            if p.exists():
                paths.append(p)
                continue
        except OSError:
            continue  # a path the OS rejects is reported by the loader
        if isinstance(ref, str) and ":" not in ref:
            try:
                from normsurgeon.io.resolve import resolve

                r = resolve(ref)
                if r.path is not None:
                    paths.append(r.path)
            except Exception:  # noqa: BLE001 - an unresolvable ref is reported by the loader
                pass
    return paths


def _real_inputs(inputs: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(as given, real path) for each input and, one level down, each symlinked entry of an input folder."""
    out = []
    for p in inputs:
        real = Path(os.path.realpath(p))
        out.append((p, real))
        if real.is_dir():
            with contextlib.suppress(OSError):
                for child in Path(p).iterdir():
                    if child.is_symlink():
                        out.append((child, Path(os.path.realpath(child))))
    return out


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_path(out: Path, inputs: Iterable[Path] = (), what: str = "output", against: str = "input") -> None:
    """Refuse (UsageError, exit 2) an output that is a symlink, an input, an ancestor of one, or inside one.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> check_output_path(d / "out", [d / "in"])  # siblings are fine
    >>> try:
    ...     check_output_path(d, [d / "in"])
    ... except Exception as e:
    ...     print(str(e).split(";")[0])
    output ... contains the input ...
    """
    out = Path(out)
    if out.is_symlink():
        target = os.readlink(out)
        raise UsageError(f"{what} {out} is a symbolic link (to {target}); give the real folder path")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} {out} exists and is not a folder")
    real_out = Path(os.path.realpath(out))
    keep_safe = "inputs are never modified" if against == "input" else "the two must be apart"
    for given, real in _real_inputs(inputs):
        if real == real_out:
            raise UsageError(f"{what} {out} is the {against} {given}; {keep_safe}")
        if _within(real, real_out):
            raise UsageError(f"{what} {out} contains the {against} {given}; replacing it would delete the {against}")
        if _within(real_out, real) and (real.is_dir() or against != "input"):
            raise UsageError(f"{what} {out} is inside the {against} folder {given}; {keep_safe}")


def is_replaceable(folder: Path) -> bool:
    """An empty folder, or one a normsurgeon command wrote (a ``normsurgeon`` section in config.json, or a
    ``*report*.json`` of ours at the top).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); is_replaceable(d)
    True
    >>> _ = (d / "notes.txt").write_text("mine"); is_replaceable(d)
    False
    """
    import json

    entries = list(folder.iterdir())
    if not entries:
        return True
    names = {p.name for p in entries}
    if any(n.endswith(".json") and "report" in n for n in names):
        return True
    if "config.json" in names:
        try:
            return isinstance(json.loads((folder / "config.json").read_text()).get("normsurgeon"), dict)
        except (OSError, ValueError, AttributeError):
            return False
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Destination:
    """A claimed output folder (see ``claim_output``)."""

    def __init__(self, out: Path, overwrite: bool, status: Callable[[str], None]):
        self.path, self.overwrite, self.status = out, overwrite, status
        self._lock_fd: int | None = None

    # -- the lock --------------------------------------------------------------------------------
    def lock(self) -> None:
        path = sibling(self.path, "lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="ignore").strip() or "?"
                os.close(fd)
                raise UsageError(f"another normsurgeon process (pid {holder}) is writing {self.path}; "
                                 "wait for it to finish or choose another output") from None
            try:  # the file we locked must still be the one at ``path`` (a releasing holder unlinks it)
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(sibling(self.path, "lock"))
        os.close(self._lock_fd)
        self._lock_fd = None

    # -- stale staging ---------------------------------------------------------------------------
    def remove_stale(self, keep: Iterable[Path] = ()) -> list[str]:
        """Remove staging and old-copy folders of this destination left by processes no longer running."""
        keep = {Path(k).name for k in keep}
        prefix = f".{hidden_stem(self.path)}."
        removed = []
        if not self.path.parent.is_dir():
            return removed
        for entry in self.path.parent.iterdir():
            name = entry.name
            if not name.startswith(prefix) or name in keep:
                continue
            kind = name[len(prefix):]
            if not kind.startswith(("partial", "old")):
                continue
            m = _PID_SUFFIX.search(kind)
            pid = int(m.group(1)) if m else None
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue
            if kind.startswith("old") and not self.path.exists() and entry.is_dir():
                # killed between the two renames of replace_folder: this is the previous output, the only copy
                os.replace(entry, self.path)
                self.status(f"restored {self.path} from {entry.name} (a replacement was interrupted)")
                continue
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() \
                else entry.unlink(missing_ok=True)
            who = f"process {pid}, no longer running" if pid is not None else "an interrupted run"
            self.status(f"removed {entry.name} beside the output (left by {who})")
            removed.append(name)
        return removed

    # -- staging ---------------------------------------------------------------------------------
    def check_free(self) -> None:
        """The destination must not exist unless overwriting (checked again just before the move), and
        --overwrite replaces only an empty folder or an earlier normsurgeon output, never a folder of
        anything else (``-o ~ --overwrite`` must not delete a home folder)."""
        if not self.path.exists():
            return
        if not self.overwrite:
            raise UsageError(f"output {self.path} already exists; pass --overwrite to replace it")
        if not is_replaceable(self.path):
            raise UsageError(f"output {self.path} exists and is not a normsurgeon output; --overwrite replaces only "
                             "those (or an empty folder): remove it yourself or choose another output")

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """An empty folder beside the destination; moved into place on success, removed on failure."""
        self.check_free()
        tmp = sibling(self.path, "partial", os.getpid())
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
            replace_folder(tmp, self.path)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_out_of_space(e, self.path)
            raise


def raise_if_out_of_space(e: BaseException, out: Path) -> None:
    """Turn a full-disk (or file-size limit) OSError into ResourceError (exit 6)."""
    if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
        raise ResourceError(f"not enough space to write {out} ({os.strerror(e.errno)}); the partial output was "
                            "removed, nothing was written") from None


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the complete folder ``tmp`` to ``out``, replacing whatever is there (renames, then cleanup).
    Modes are set from the umask first (``apply_umask``)."""
    apply_umask(tmp)
    old = sibling(out, "old", os.getpid())
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def claim_output(out: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                 status: Callable[[str], None] = lambda s: None, keep: Iterable[Path] = (),
                 also: Iterable[tuple[str, Path | None]] = (), lock: bool = True) -> Iterator[Destination]:
    """Check ``out`` against ``inputs``, lock it, clear dead runs' leftovers; yield a ``Destination``.

    ``keep``: hidden siblings not to treat as stale (the streaming convert's resumable partial folder).
    ``also``: other folders the command writes, as (option name, path), e.g. ("--checkpoint-dir", p):
    each obeys the same rules against the inputs and may not be, hold or sit inside ``out``.
    ``lock=False``: path checks only (the non-main processes of a multi-process run).
    """
    out = Path(out)
    local_inputs = input_paths(inputs)
    check_output_path(out, local_inputs)
    for name, path in also:
        if path is not None:
            check_output_path(path, local_inputs, what=name)
            check_output_path(path, [out], what=name, against="output")
    dest = Destination(out, overwrite, status)
    dest.check_free()
    if not lock:
        yield dest
        return
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        dest.lock()
    except OSError as e:
        _remove_empty(created)
        raise_if_out_of_space(e, out)
        raise UsageError(f"cannot write the output {out}: {e.strerror or e}") from None
    try:
        dest.remove_stale(keep)
        dest.check_free()  # again: a restored previous output counts
        yield dest
    finally:
        dest.unlock()
        if not out.exists():
            _remove_empty(created)  # a failed run leaves no folders it made on the way to the output


@contextlib.contextmanager
def maybe_claim_output(out: str | Path | None, **kwargs) -> Iterator[Destination | None]:
    """``claim_output(out, **kwargs)``, or None when there is no output (``out`` None: a dry run, a report
    printed only)."""
    if out is None:
        yield None
        return
    with claim_output(out, **kwargs) as dest:
        yield dest


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # deepest first
        with contextlib.suppress(OSError):
            p.rmdir()


def user_error_for(e: OSError, outputs: Iterable[str | Path | None] = ()) -> NormSurgeonError:
    """The documented error for an OSError: a full disk is ResourceError (6), a path at or beside one of
    ``outputs`` is UsageError (2, the output cannot be written), anything else InputError (5).

    >>> user_error_for(OSError(36, "File name too long", "m" * 300)).exit_code
    5
    >>> user_error_for(PermissionError(13, "Permission denied", "/o/.x.partial-1/a"), ["/o/x"]).exit_code
    2
    """
    from normsurgeon.errors import InputError

    if e.errno in SPACE_ERRNOS:
        return ResourceError(f"not enough space to write ({os.strerror(e.errno)}); nothing was written")
    why = e.strerror or type(e).__name__
    name = os.fsdecode(e.filename) if e.filename is not None else None
    shown = name if name is None or len(name) <= 120 else name[:60] + "…" + name[-40:]
    for out in outputs:
        if out is not None and name is not None and _output_side(Path(os.path.abspath(name)), Path(out)):
            return UsageError(f"cannot write the output {out}: {why} ({shown})")
    return InputError(f"cannot read {shown}: {why}" if name else f"cannot read the input: {why}")


def _output_side(target: Path, out: Path) -> bool:
    """Is ``target`` the output, inside it, on the way to it, or one of its hidden siblings (staging, lock)?"""
    base = Path(os.path.abspath(out))
    prefixes = (f".{hidden_stem(base)}.", f"{base.name}.")  # staging and lock; OUT.checkpoints and the like
    if target in base.parents:
        return True
    return any(p == base or (p.parent == base.parent and p.name.startswith(prefixes)) for p in [target, *target.parents])
