"""Every Python block of the README runs as written (in a scratch folder that has the repository's
``examples/``), so the documented API cannot drift from the code."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_blocks():
    assert BLOCKS


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(i, tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    import normsurgeon

    import normsurgeon.verification.report  # noqa: F401 - a submodule imported first must not hide the API
    assert callable(normsurgeon.verify) and callable(normsurgeon.convert)
    namespace: dict = {}
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), namespace)  # noqa: S102 - our own README
    if "report" in namespace:
        assert namespace["report"]["status"] == "pass"
