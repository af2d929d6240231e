"""Check a Hugging Face model folder before anything is loaded: config, weights format, shard index.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> try:
...     check_folder(d)
... except Exception as e:
...     print(type(e).__name__)
InputError
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path, PurePosixPath

from normsurgeon.errors import InputError
from normsurgeon.io.safetensors_header import read_safetensors_header, regular_file_size

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"  # with the index, the only names transformers loads safetensors from


@dataclasses.dataclass
class FolderInfo:
    path: Path
    config: dict
    weight_files: list[Path]  # the files that are loaded
    weights_format: str  # "safetensors" | "pickle"
    tensor_names: list[str]
    pickle_files: list[Path] = dataclasses.field(default_factory=list)  # read only with allow_pickle


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        if cfg_path.exists():
            raise InputError(f"{cfg_path} is not a regular file; it is not opened")
        raise InputError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path} is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path} does not hold a JSON object")
    return cfg


def safetensors_keys(file: Path) -> list[str]:
    """Header-only read of one file's tensor names, validated as the safetensors library validates it;
    a truncated, corrupt or non-regular file is an InputError (``normsurgeon.io.safetensors_header``)."""
    return list(read_safetensors_header(file).tensors)


def shard_path(folder: Path, name: object) -> Path:
    """``folder / name`` for a shard an index names; a name that could leave ``folder`` is an InputError.

    Only the name is judged (a shard that is a symlink to a blob elsewhere, as in the hub cache, is fine).

    >>> shard_path(Path("m"), "model-00001-of-00002.safetensors").as_posix()
    'm/model-00001-of-00002.safetensors'
    >>> try:
    ...     shard_path(Path("m"), "../x.safetensors")
    ... except InputError as e:
    ...     print(e)
    the shard index names '../x.safetensors': shards must be .safetensors files inside the model folder
    """
    rel = PurePosixPath(name.replace("\\", "/")) if isinstance(name, str) else PurePosixPath("/")
    if rel.is_absolute() or not rel.parts or ".." in rel.parts or "\0" in name or not name.endswith(".safetensors"):
        raise InputError(f"the shard index names {name!r}: shards must be .safetensors files inside the model folder")
    return folder / name


def read_shard_index(path: Path) -> tuple[dict[str, str], list[Path]]:
    """``model.safetensors.index.json``'s weight map and its shard files, every one of which must be a
    regular file inside ``path``; every name is checked before any shard is touched."""
    index = path / SAFETENSORS_INDEX
    regular_file_size(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{index.name} is not a valid shard index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index.name} is not a valid shard index (its weight_map is not an object)")
    shards = sorted({shard_path(path, f) for f in weight_map.values()})
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise InputError(f"the shard index names missing files: {', '.join(missing[:3])}")
    for s in shards:
        regular_file_size(s)
    return weight_map, shards


def check_folder(path: Path, allow_pickle: bool = False) -> FolderInfo:
    """Validate ``path`` as a model folder and list the weight files that will be loaded (headers only).

    Safetensors are loaded from the shard index, else from ``model.safetensors`` (what transformers loads
    with ``use_safetensors=True``); other ``*.safetensors`` files are not weights. Pickles are used only
    with ``allow_pickle``: when there are no such safetensors, or (see ``loader``) they do not cover the model.
    """
    if not path.is_dir():
        raise InputError(f"no such model folder: {path}")
    cfg = read_config(path)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    _check_named_weights(cfg, allow_pickle)
    if allow_pickle:
        for p in pickles:
            regular_file_size(p)
    if os.path.lexists(path / SAFETENSORS_INDEX):
        weight_map, shards = read_shard_index(path)
        names: list[str] = []
        for s in shards:
            keys = set(safetensors_keys(s))
            expected = {k for k, f in weight_map.items() if path / f == s}
            if expected - keys:
                raise InputError(f"{s.name} lacks {len(expected - keys)} tensors the index puts there "
                                 f"(e.g. {sorted(expected - keys)[0]})")
            names.extend(sorted(keys))
        return FolderInfo(path, cfg, shards, "safetensors", names, pickles)
    single = path / SAFETENSORS_SINGLE
    if os.path.lexists(single):
        return FolderInfo(path, cfg, [single], "safetensors", safetensors_keys(single), pickles)
    if pickles:
        if not allow_pickle:
            raise InputError(f"{path} holds pickle weights ({pickles[0].name}) and no {SAFETENSORS_SINGLE}; pickle "
                             "can run code, so it is refused: pass --allow-pickle to load it with weights_only=True")
        return FolderInfo(path, cfg, pickles, "pickle", [], pickles)
    others = sorted(path.glob("*.safetensors"))
    if others:
        raise InputError(f"{path} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}, so no weights "
                         f"({others[0].name} is not a name Hugging Face loads weights from)")
    raise InputError(f"{path} has a config.json but no weights (*.safetensors)")


def _check_named_weights(cfg: dict, allow_pickle: bool) -> None:
    """config.json's ``transformers_weights`` makes transformers load that file whatever else the folder
    holds; a name that is not safetensors is a pickle (transformers allows ``adapter_model.bin``)."""
    named = cfg.get("transformers_weights")
    if named is None or allow_pickle:
        return
    if not isinstance(named, str) or not named.endswith((".safetensors", ".safetensors.index.json")):
        raise InputError(f"config.json's transformers_weights names {named!r}, a pickle; pickle can run code, so "
                         "it is refused: pass --allow-pickle to load it with weights_only=True")
