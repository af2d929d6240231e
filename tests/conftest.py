"""Shared fixtures: tiny random models saved as Hugging Face folders."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

# Scripts that tests launch in subprocesses (not test modules; importing them needs their environment).
collect_ignore = ["lnfree_ddp_script.py"]

from model_zoo import build  # noqa: E402


@pytest.fixture(scope="session")
def saved_family(tmp_path_factory):
    """Return a function family -> folder holding that family's randomised tiny model (cached)."""
    cache: dict[str, Path] = {}

    def get(family: str, dtype: torch.dtype = torch.float32) -> Path:
        key = f"{family}-{dtype}"
        if key not in cache:
            folder = tmp_path_factory.mktemp(key)
            build(family).to(dtype).save_pretrained(folder)
            cache[key] = folder
        return cache[key]

    return get
