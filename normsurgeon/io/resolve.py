"""Turn a MODEL argument into something loadable: a local folder, a cached hub id, or a factory.

Offline first: a hub id is looked up only in the local Hugging Face cache.

>>> resolve("normsurgeon.testing:tiny_gpt2").kind
'factory'
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from normsurgeon.errors import InputError

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclasses.dataclass
class ResolvedRef:
    ref: str
    kind: str  # "folder" | "factory"
    path: Path | None = None
    factory: str | None = None
    revision: str | None = None


def resolve(ref: str, revision: str | None = None) -> ResolvedRef:
    """Resolve ``ref``: an existing path wins, then ``package.module:factory``, then a cached hub id."""
    path = Path(ref).expanduser()
    if path.exists():
        return ResolvedRef(ref, "folder", path=path)
    if _FACTORY.match(ref):
        return ResolvedRef(ref, "factory", factory=ref)
    if "@" in ref and revision is None:
        ref, revision = ref.split("@", 1)
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") > 1
    if looks_like_path or not _HUB_ID.match(ref):
        raise InputError(f"no such model folder: {ref}")
    return ResolvedRef(ref, "folder", path=_from_cache(ref, revision), revision=revision)


def _from_cache(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of transformers
        raise InputError(f"no local folder {repo_id!r}, and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        raise InputError(f"{repo_id!r} is neither a local folder nor in the local Hugging Face cache; "
                         f"normsurgeon does not download: fetch it first with `hf download {repo_id}` "
                         "or pass a local folder") from None
