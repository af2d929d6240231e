"""A hub id resolves offline from the local Hugging Face cache layout; revisions are honoured."""
from __future__ import annotations

import shutil

from normsurgeon.conversion import convert
from normsurgeon.io.resolve import resolve


def _fake_cache(cache, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


def test_cached_hub_id_converts_offline(saved_family, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = _fake_cache(cache, "someorg/tiny-gpt2", saved_family("gpt2"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert resolve("someorg/tiny-gpt2").path == snap
    report = convert("someorg/tiny-gpt2", tmp_path / "out", to="rmsnorm")
    assert report["status"] == "pass"
