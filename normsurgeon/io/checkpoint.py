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
from pathlib import Path

from safetensors import safe_open

from normsurgeon.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclasses.dataclass
class FolderInfo:
    path: Path
    config: dict
    weight_files: list[Path]
    weights_format: str  # "safetensors" | "pickle"
    tensor_names: list[str]


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path} is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path} does not hold a JSON object")
    return cfg


def safetensors_keys(file: Path) -> list[str]:
    """Header-only read of one file's tensor names; a truncated or corrupt file is an InputError."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise InputError(f"{file.name} is not a readable safetensors file ({e})") from None


def read_shard_index(path: Path) -> tuple[dict[str, str], list[Path]]:
    """``model.safetensors.index.json``'s weight map and its shard files, every one of which must exist."""
    index = path / SAFETENSORS_INDEX
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{index.name} is not a valid shard index ({e})") from None
    shards = sorted({path / f for f in weight_map.values()})
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise InputError(f"the shard index names missing files: {', '.join(missing[:3])}")
    return weight_map, shards


def check_folder(path: Path, allow_pickle: bool = False) -> FolderInfo:
    """Validate ``path`` as a model folder and list its weight files (headers only)."""
    if not path.is_dir():
        raise InputError(f"no such model folder: {path}")
    cfg = read_config(path)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map, shards = read_shard_index(path)
        names: list[str] = []
        for s in shards:
            keys = set(safetensors_keys(s))
            expected = {k for k, f in weight_map.items() if path / f == s}
            if expected - keys:
                raise InputError(f"{s.name} lacks {len(expected - keys)} tensors the index puts there "
                                 f"(e.g. {sorted(expected - keys)[0]})")
            names.extend(sorted(keys))
        return FolderInfo(path, cfg, shards, "safetensors", names)
    single = sorted(path.glob("*.safetensors"))
    if single:
        names = [k for f in single for k in safetensors_keys(f)]
        return FolderInfo(path, cfg, single, "safetensors", names)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise InputError(f"{path} holds only pickle weights ({pickles[0].name}); pickle can run code, so "
                             "it is refused: pass --allow-pickle to load it with weights_only=True")
        return FolderInfo(path, cfg, pickles, "pickle", [])
    raise InputError(f"{path} has a config.json but no weights (*.safetensors)")
