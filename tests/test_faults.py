"""Fault injection: bad paths, faults and races, for every command that writes, on the in-memory and the
streaming path. Each case checks the README's promises (tests/faults.py): documented exit code, one
``error:`` line on stderr, no traceback, nothing at or beside the destination, inputs byte-identical.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from faults import (ENV, as_tuple, assert_failed_cleanly, cli, cli_subprocess, error_line, json_error, leftovers,
                    tree_digest)
from normsurgeon.io.destination import hidden_stem, sibling
from normsurgeon.testing import tiny_gpt2

TEXT = "DEF F(X):\n    RETURN X + 1\n" * 300  # bytes < 96: the tiny GPT-2's vocabulary


@pytest.fixture
def proj(tmp_path):
    """tmp/proj/m: a tiny GPT-2 folder (randomised norms), tmp/proj/data.txt: text for it."""
    root = tmp_path / "proj"
    tiny_gpt2().save_pretrained(root / "m")
    (root / "data.txt").write_text(TEXT)
    (root / "lower.txt").write_text(TEXT.lower())  # bytes >= 96: outside the tiny vocabulary
    return root


# argv for every command that writes an output folder, given the model, the output and the data
WRITERS = {
    "convert": lambda m, o, d: ["convert", m, "-o", o],
    "convert --stream": lambda m, o, d: ["convert", m, "-o", o, "--stream"],
    "fold-bn": lambda m, o, d: ["fold-bn", m, "-o", o],
    "place": lambda m, o, d: ["place", m, "--scheme", "lns", "--data", d, "--tokenizer", "bytes", "-o", o],
    "diagnose": lambda m, o, d: ["diagnose", m, "--data", d, "--tokenizer", "bytes", "-o", o],
    "remove-ln": lambda m, o, d: ["remove-ln", m, "--data", d, "--tokenizer", "bytes", "-o", o],
    "prepbn": lambda m, o, d: ["prepbn", m, "--data", d, "--tokenizer", "bytes", "-o", o],
}
READERS = {
    "inspect": lambda m: ["inspect", m],
    "verify": lambda m: ["verify", m, m],
    "verify --layerwise": lambda m: ["verify", m, m, "--layerwise"],
    "plan": lambda m: ["plan", m],
    "convert --dry-run": lambda m: ["convert", m, "-o", "unused", "--dry-run"],
}


# -- 1, 2: the output is the input, holds it, or sits inside it ---------------------------------------

@pytest.mark.parametrize("command", sorted(WRITERS))
@pytest.mark.parametrize("where", ["ancestor", "inside", "same", "inside-via-symlink"])
def test_output_may_not_touch_the_input(capfd, proj, command, where):
    m, d = proj / "m", proj / "data.txt"
    before = tree_digest(proj)
    if where == "ancestor":
        out, extra = proj, ["--overwrite"]
    elif where == "inside":
        out, extra = m / "sub", []
    elif where == "same":
        out, extra = m, ["--overwrite"]
    else:
        link = proj.parent / "link"
        link.symlink_to(m, target_is_directory=True)
        out, extra = link / "sub", []
    result = cli(capfd, *WRITERS[command](m, out, d), *extra)
    line = assert_failed_cleanly(result, 2, None, before, proj, words=("input",))
    assert "inputs are never modified" in line or "would delete the input" in line
    assert sorted(p.name for p in proj.iterdir()) == ["data.txt", "lower.txt", "m"]
    assert sorted(p.name for p in m.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_output_may_not_hold_a_symlinked_input_file(capfd, tmp_path):
    """A hub-cache style input: its weights are a symlink to a blob elsewhere; that blob's folder is an input too."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snap"
    tiny_gpt2().save_pretrained(blobs)
    snap.mkdir()
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    before = tree_digest(blobs)
    result = cli(capfd, "convert", snap, "-o", blobs, "--overwrite")
    assert_failed_cleanly(result, 2, None, before, blobs, words=("contains the input",))


@pytest.mark.parametrize("command", ["remove-ln", "prepbn"])
@pytest.mark.parametrize("where", ["in-input", "in-output", "holds-output"])
def test_checkpoint_dir_obeys_the_same_rule(capfd, proj, tmp_path, command, where):
    m, d, out = proj / "m", proj / "data.txt", tmp_path / "out"
    ckpt = {"in-input": m / "ckpt", "in-output": out / "ckpt", "holds-output": tmp_path}[where]
    before = tree_digest(proj)
    result = cli(capfd, *WRITERS[command](m, out, d), "--checkpoint-dir", ckpt, "--finetune")
    assert_failed_cleanly(result, 2, out, before, proj, words=("--checkpoint-dir",))


# -- 8: paths the OS rejects ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", sorted(WRITERS))
def test_model_path_too_long_is_an_input_error(capfd, proj, tmp_path, command):
    out = tmp_path / "out"
    bad = tmp_path / ("m" * 300)
    result = cli(capfd, *WRITERS[command](bad, out, proj / "data.txt"))
    assert_failed_cleanly(result, 5, out, tree_digest(proj), proj, words=("File name too long",))


@pytest.mark.parametrize("command", sorted(READERS))
def test_model_path_too_long_for_reading_commands(capfd, tmp_path, command):
    result = cli(capfd, *READERS[command](tmp_path / ("m" * 300)))
    assert result[0] == 5, result
    assert "File name too long" in error_line(result[2])


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_output_path_too_long_is_a_usage_error(capfd, proj, tmp_path, command):
    out = tmp_path / ("o" * 300)
    before = tree_digest(proj)
    result = cli(capfd, *WRITERS[command](proj / "m", out, proj / "data.txt"))
    assert_failed_cleanly(result, 2, None, before, proj, words=("output",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_legal_245_byte_output_name_works(capfd, proj, tmp_path, stream):
    out = tmp_path / ("o" * 245)
    result = cli(capfd, "convert", proj / "m", "-o", out, *(["--stream"] if stream else []))
    assert result[0] == 0, result
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["proj", out.name])
    assert len((sibling(out, "partial", 4194304)).name.encode()) <= 255


# -- 9: ordinary conditions that used to be internal errors ---------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_dangling_symlink_output_is_refused(capfd, proj, tmp_path, stream):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    before = tree_digest(proj)
    result = cli(capfd, "convert", proj / "m", "-o", out, "--overwrite", *(["--stream"] if stream else []))
    assert_failed_cleanly((result[0], result[1], result[2]), 2, None, before, proj, words=("symbolic link",))
    assert out.is_symlink() and os.readlink(out) == str(tmp_path / "nowhere")  # left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "proj"]


def test_binary_recipe_is_a_usage_error(capfd, proj, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(bytes(range(256)) * 4)
    before = tree_digest(proj)
    result = cli(capfd, "convert", proj / "m", "-o", tmp_path / "out", "--recipe", recipe)
    assert_failed_cleanly(result, 2, tmp_path / "out", before, proj, words=("recipe",))


@pytest.mark.parametrize("tamper", [
    lambda s: s.update(rmsnorm="not a dict"),
    lambda s: s.update(rmsnorm={"transformer.h.9.ln_1": 1e-5}),
    lambda s: s.update(crms={"full_size": "x"}, stock_loadable=False),
    lambda s: s.pop("source_model_type") and s.update(stock_loadable=False),
])
@pytest.mark.parametrize("layerwise", [False, True])
def test_tampered_normsurgeon_section_is_an_input_error(capfd, proj, tmp_path, tamper, layerwise):
    out = tmp_path / "out"
    assert cli(capfd, "convert", proj / "m", "-o", out)[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    tamper(cfg["normsurgeon"])
    (out / "config.json").write_text(json.dumps(cfg))
    result = cli(capfd, "verify", proj / "m", out, *(["--layerwise"] if layerwise else []))
    assert result[0] == 5, result
    assert "normsurgeon section" in error_line(result[2]) or "config" in error_line(result[2])


def _mount_tmpfs(path: Path, size: str = "64m", read_only: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("stream", [False, True])
def test_read_only_output_folder_is_a_usage_error(capfd, proj, tmp_path, stream):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, read_only=True):
        pytest.skip("cannot mount a read-only tmpfs here (needs root); the injected EROFS test below covers the mapping")
    try:
        before = tree_digest(proj)
        result = cli(capfd, "convert", proj / "m", "-o", ro / "out", *(["--stream"] if stream else []))
        assert_failed_cleanly(result, 2, ro / "out", before, proj, words=("Read-only file system",))
    finally:
        _umount(ro)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_output_write_refused_midway_is_a_usage_error(capfd, proj, tmp_path, monkeypatch, err, stream):
    """An OSError while writing the weights (the folder became read-only, permissions): exit 2, staging gone."""
    import normsurgeon.stream.execute as execute

    def refuse(tmp, layouts, fresh, direct=True):
        raise OSError(err, os.strerror(err), str(tmp / layouts[0].name))
    monkeypatch.setattr(execute, "open_shards", refuse)
    out = tmp_path / "out"
    before = tree_digest(proj)
    result = cli(capfd, "convert", proj / "m", "-o", out, *(["--stream"] if stream else []))
    assert_failed_cleanly(result, 2, out, before, proj, words=("cannot write the output",))


def _limit_file_size(limit: int):
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("stream", [False, True])
def test_full_disk_is_exit_6_and_removes_the_staging(proj, tmp_path, stream):
    """A real limit on the bytes a process may write (RLIMIT_FSIZE: EFBIG, like ENOSPC a space error)."""
    out = tmp_path / "out"
    before = tree_digest(proj)
    p = cli_subprocess("convert", proj / "m", "-o", out, *(["--stream"] if stream else []),
                       preexec_fn=_limit_file_size(64 * 1024))
    assert_failed_cleanly(as_tuple(p), 6, out, before, proj, words=("not enough space",))


@pytest.mark.parametrize("stream", [False, True])
def test_a_really_full_file_system(capfd, proj, tmp_path, stream):
    """A 64 KiB tmpfs cannot hold the ~130 KB converted model."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, size="64k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE test covers the mapping")
    try:
        before = tree_digest(proj)
        result = cli(capfd, "convert", proj / "m", "-o", small / "out", *(["--stream"] if stream else []))
        assert_failed_cleanly(result, 6, small / "out", before, proj, words=("not enough space",))
        assert list(small.iterdir()) == []
    finally:
        _umount(small)


# -- 10: one line, details with --json ------------------------------------------------------------------

def _corrupt_a_tensor(monkeypatch):
    """Make the conversion wrong in block 1 (a plausible mis-fold), in memory or streamed (one engine)."""
    from normsurgeon.stream import execute

    original = execute.run_job

    def bad(job, plan, reader):
        tensors = original(job, plan, reader)
        for name, t in tensors.items():
            if name == "transformer.h.1.mlp.c_fc.bias":
                tensors[name] = t + 0.05
        return tensors
    monkeypatch.setattr(execute, "run_job", bad)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("as_json", [False, True])
def test_failed_verification_is_one_line_with_metric_threshold_and_place(capfd, proj, tmp_path, monkeypatch,
                                                                        stream, as_json):
    _corrupt_a_tensor(monkeypatch)
    out = tmp_path / "out"
    before = tree_digest(proj)
    argv = ["convert", proj / "m", "-o", out] + (["--stream", "--verify-mode", "layerwise"] if stream else [])
    result = cli(capfd, *argv, *(["--json"] if as_json else []))
    line = assert_failed_cleanly(result, 3, out, before, proj, words=("threshold", "first appears at"))
    assert "max |Δ log-prob|" in line or "KL" in line
    assert len(line) < 400
    if as_json:
        doc = json_error(result[1])
        assert doc["exit_code"] == 3 and doc["details"]["status"] == "fail" and doc["details"]["metrics"]
    else:
        assert result[1].strip() == ""  # no Markdown report dumped anywhere


@pytest.mark.parametrize("argv,words", [
    (lambda p: ["convert", p / "m", "-o", p.parent / "o", "--to", "nonsense"], ("--to",)),
    (lambda p: ["convert", p / "m", "-o", p.parent / "o", "--bogus"], ("No such option",)),
    (lambda p: ["convert", p / "m"], ("Missing option",)),
    (lambda p: ["remove-ln", p / "m", "--data", p / "data.txt", "--tokenizer", p / "nope", "-o", p.parent / "o"], ()),
    (lambda p: ["convert", p / "m", "-o", p.parent / "o", "--max-shard-size", "lots"], ("size",)),
    (lambda p: ["diagnose", p / "m", "--data", p / "lower.txt", "--tokenizer", "bytes", "--seq-len", "16"],
     ("vocabulary",)),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_errors_are_one_line_and_json_on_request(capfd, proj, argv, words, as_json):
    before = tree_digest(proj)
    result = cli(capfd, *argv(proj), *(["--json"] if as_json else []))
    assert_failed_cleanly(result, result[0], proj.parent / "o", before, proj, words=words)
    assert result[0] in (2, 5)
    if as_json:
        assert json_error(result[1])["exit_code"] == result[0]


def test_no_wrapping_of_long_error_lines_in_a_narrow_terminal(proj, tmp_path):
    deep = tmp_path / ("x" * 90) / "model"
    p = cli_subprocess("convert", deep, "-o", tmp_path / "o", "--to", "nonsense" * 12)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


# -- 11: two writers, one destination -------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from normsurgeon.io.destination import claim_output
with claim_output(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("stream", [False, True])
def test_second_writer_to_the_same_output_is_refused_naming_the_first(capfd, proj, tmp_path, stream):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_digest(proj)
        result = cli(capfd, "convert", proj / "m", "-o", out, "--overwrite", *(["--stream"] if stream else []))
        line = assert_failed_cleanly(result, 2, None, before, proj, words=(f"pid {holder.pid}",))
        assert "another normsurgeon process" in line and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli(capfd, "convert", proj / "m", "-o", out)[0] == 0  # the lock died with its holder
    assert leftovers(out) == ["out"]


def test_two_converts_at_once_one_wins_one_is_refused(proj, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "normsurgeon.cli", "convert", str(proj / "m"), "-o", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    # Either they overlapped (one refused: another process is writing, or the output now exists) or one
    # finished before the other started (the second finds the output and refuses without --overwrite).
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    assert "another normsurgeon process" in loser or "already exists" in loser
    assert leftovers(out) == ["out"]


# -- 12: staging left by killed runs --------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_of_a_dead_process_is_removed_and_said(capfd, proj, tmp_path):
    out = tmp_path / "out"
    pid = _dead_pid()
    stale = sibling(out, "partial", pid)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    code, _, err = cli(capfd, "convert", proj / "m", "-o", out)
    assert code == 0
    assert not stale.exists() and stale.name in err and f"process {pid}" in err
    assert leftovers(out) == ["out"]


def _wait_for(predicate, timeout: float = 120) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("stream", [False, True])
def test_sigkill_midway_then_rerun_cleans_up(proj, tmp_path, stream):
    out = tmp_path / "out"
    extra = ["--stream", "--verify-mode", "layerwise"] if stream else []
    p = subprocess.Popen([sys.executable, "-m", "normsurgeon.cli", "convert", str(proj / "m"), "-o", str(out), *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    prefix = f".{hidden_stem(out)}.partial"
    assert _wait_for(lambda: any(q.name.startswith(prefix) for q in tmp_path.iterdir()) or p.poll() is not None)
    p.send_signal(signal.SIGKILL)
    p.wait()
    staged = [q.name for q in tmp_path.iterdir() if q.name.startswith(prefix)]
    assert staged, "the kill came too late to test anything"
    before = tree_digest(proj)
    again = cli_subprocess("convert", proj / "m", "-o", out, *extra)
    assert again.returncode == 0, again.stderr
    assert staged[0] in again.stderr and "removed" in again.stderr
    assert leftovers(out) == ["out"] and tree_digest(proj) == before


def test_a_replacement_killed_between_its_renames_restores_the_previous_output(capfd, proj, tmp_path):
    """replace_folder moves OUT aside before moving the new folder in: a kill in between must not lose it."""
    out = tmp_path / "out"
    assert cli(capfd, "convert", proj / "m", "-o", out)[0] == 0
    before = tree_digest(out)
    aside = sibling(out, "old", _dead_pid())
    os.replace(out, aside)  # what the killed run had done
    code, _, err = cli(capfd, "convert", proj / "m", "-o", out)  # no --overwrite: the restored output exists
    assert code == 2 and "already exists" in err and "restored" in err
    assert {k.replace(str(aside), str(out)): v for k, v in tree_digest(out).items()} == before
    assert leftovers(out) == ["out"]


@pytest.mark.parametrize("command", ["convert", "convert --stream", "diagnose"])
def test_overwrite_never_replaces_a_folder_that_is_not_ours(capfd, proj, tmp_path, command):
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "a.jpg").write_bytes(b"\xff\xd8" * 100)
    (home / "config.json").write_text('{"not": "a normsurgeon output"}')
    before = tree_digest(home, proj)
    result = cli(capfd, *WRITERS[command](proj / "m", home, proj / "data.txt"), "--overwrite")
    assert_failed_cleanly(result, 2, None, before, home, proj, words=("not a normsurgeon output",))
    assert cli(capfd, *WRITERS[command](proj / "m", tmp_path / "ours", proj / "data.txt"))[0] == 0
    assert cli(capfd, *WRITERS[command](proj / "m", tmp_path / "ours", proj / "data.txt"), "--overwrite")[0] == 0
