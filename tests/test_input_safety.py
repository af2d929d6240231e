"""Hostile or broken inputs (issue 11, items 3-5): decoys cannot unlock pickles, shard indexes cannot
leave the model folder, non-regular files are never opened, and safetensors headers are validated the
way the safetensors library validates them, on the in-memory and the streaming path alike."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from normsurgeon.errors import InputError
from normsurgeon.io.checkpoint import check_folder
from normsurgeon.io.loader import load_model
from normsurgeon.io.safetensors_header import DTYPES
from normsurgeon.stream.headers import read_checkpoint_index, read_header, read_tensor
from normsurgeon.testing import tiny_gpt2

ROOT = Path(__file__).resolve().parent.parent


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def gpt2_safetensors(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2().save_pretrained(folder)
    return folder


# --- 3. a decoy *.safetensors must not unlock a pickle ------------------------------------------------

class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a real code-execution payload that leaves a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Every ``torch.load`` call (transformers looks it up on the module at call time)."""
    calls = []
    real = torch.load

    def spy(f, *args, **kwargs):
        calls.append((Path(f).name, kwargs.get("weights_only")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def _pickle_folder(folder: Path, payload_marker: Path | None = None) -> Path:
    """config.json + pytorch_model.bin: the real weights, or an exploit that creates ``payload_marker``."""
    folder.mkdir()
    model = tiny_gpt2()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    torch.save(_Payload(payload_marker) if payload_marker else model.state_dict(), folder / "pytorch_model.bin")
    return folder


def _decoy(folder: Path, kind: str) -> None:
    if kind == "unrelated":
        save_file({"unrelated": torch.zeros(2)}, str(folder / "x.safetensors"))
    elif kind == "garbage":
        (folder / "x.safetensors").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00 not a header at all")
    elif kind == "empty":
        (folder / "x.safetensors").write_bytes(b"")
    elif kind == "model_named":  # the name transformers does load: it just does not cover the model
        save_file({"unrelated": torch.zeros(2)}, str(folder / "model.safetensors"))


DECOYS = ["unrelated", "garbage", "empty", "model_named"]


def test_the_payload_is_live(tmp_path):
    """The exploit used below really runs code when unpickled without weights_only."""
    marker = tmp_path / "pwned"
    torch.load(_pickle_folder(tmp_path / "m", marker) / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("decoy", DECOYS)
def test_decoy_safetensors_does_not_unlock_pickle(tmp_path, decoy, torch_load_calls):
    marker = tmp_path / "pwned"
    folder = _pickle_folder(tmp_path / "m", marker)
    _decoy(folder, decoy)
    with pytest.raises(InputError) as e:
        load_model(str(folder))
    assert "--allow-pickle" in _one_line(e), e.value
    assert torch_load_calls == [] and not marker.exists()


@pytest.mark.parametrize("decoy", DECOYS)
def test_decoy_with_allow_pickle_loads_the_pickle_weights_only(tmp_path, decoy, torch_load_calls):
    folder = _pickle_folder(tmp_path / "m")
    _decoy(folder, decoy)
    loaded = load_model(str(folder), allow_pickle=True).model
    assert torch_load_calls and all(name == "pytorch_model.bin" and wo is True for name, wo in torch_load_calls)
    expected = tiny_gpt2().state_dict()
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_decoy_refused_on_the_cli(tmp_path):
    from typer.testing import CliRunner

    from normsurgeon.cli import app

    folder = _pickle_folder(tmp_path / "m", tmp_path / "pwned")
    _decoy(folder, "unrelated")
    r = CliRunner().invoke(app, ["convert", str(folder), "-o", str(tmp_path / "o")])
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 5 and len(errors) == 1 and "--allow-pickle" in errors[0], r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "pwned").exists()


def test_config_named_pickle_weights_refused(gpt2_safetensors, tmp_path, torch_load_calls):
    """``transformers_weights`` in config.json makes transformers load that file, even with use_safetensors."""
    folder = tmp_path / "m"
    shutil.copytree(gpt2_safetensors, folder)
    torch.save(tiny_gpt2().state_dict(), folder / "adapter_model.bin")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, transformers_weights="adapter_model.bin")))
    with pytest.raises(InputError) as e:
        load_model(str(folder))
    assert "transformers_weights" in _one_line(e) and "--allow-pickle" in str(e.value)
    assert torch_load_calls == []


def test_safetensors_that_do_not_cover_the_model_are_an_input_error(tmp_path):
    folder = tmp_path / "m"
    tiny_gpt2().save_pretrained(folder)
    save_file({"unrelated": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(InputError) as e:
        load_model(str(folder))
    assert "missing keys" in _one_line(e) and "pickle" not in str(e.value)


def test_safetensors_not_named_for_loading_is_an_input_error(gpt2_safetensors, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(gpt2_safetensors, folder)
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    with pytest.raises(InputError) as e:
        check_folder(folder)
    assert "no model.safetensors" in _one_line(e)


# --- 4. shard names stay inside the folder; only regular files are opened -----------------------------

def _indexed(tmp_path: Path, source: Path, name_for) -> Path:
    """A folder whose index maps every tensor of ``source``'s model.safetensors to ``name_for(folder,
    outside)``, where ``outside`` is a valid copy of it outside the folder: the OS resolves every name
    below to a readable copy, so only the name check can refuse it."""
    folder = tmp_path / "models" / "m"
    folder.mkdir(parents=True)
    shutil.copy(source / "config.json", folder)
    outside = tmp_path / "models" / "x.safetensors"
    shutil.copy(source / "model.safetensors", outside)
    with safe_open(str(outside), "pt") as f:
        keys = list(f.keys())
    name = name_for(folder, outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
    return folder


def _copy_as(name: str):
    def make(folder: Path, outside: Path) -> str:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(outside, folder / name)
        return name
    return make


ESCAPES = {
    "parent": lambda folder, outside: "../x.safetensors",
    "absolute": lambda folder, outside: str(outside),
    "double_slash": lambda folder, outside: "/" + str(outside),  # POSIX keeps "//" as the root
    "dotdot_inside": lambda folder, outside: (folder / "sub").mkdir() or "sub/../../x.safetensors",
    "backslash": _copy_as("..\\x.safetensors"),  # a plain name on POSIX, a way out on Windows
    "not_safetensors": _copy_as("pytorch_model.bin"),  # transformers torch.loads a shard not named .safetensors
    "not_a_string": lambda folder, outside: ["x.safetensors"],
}


@pytest.mark.parametrize("escape", ESCAPES)
def test_index_names_leaving_the_folder_are_refused(gpt2_safetensors, tmp_path, escape):
    folder = _indexed(tmp_path, gpt2_safetensors, ESCAPES[escape])
    for read in (check_folder, read_checkpoint_index):
        with pytest.raises(InputError) as e:
            read(folder)
        assert "must be .safetensors files inside the model folder" in _one_line(e), (read, e.value)


def test_hub_cache_symlinked_shards_are_fine(gpt2_safetensors, tmp_path):
    """Hub snapshots hold symlinks to blobs outside the snapshot folder: the names are what is judged."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    folder = tmp_path / "snapshots" / "abc"
    folder.mkdir(parents=True)
    for f in gpt2_safetensors.iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (folder / f.name).symlink_to(os.path.relpath(blobs / f"blob-{f.name}", folder))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (blobs / "blob-index").write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in keys}}))
    (folder / "model.safetensors.index.json").symlink_to(os.path.relpath(blobs / "blob-index", folder))
    assert check_folder(folder).weight_files == [folder / "model.safetensors"]
    assert set(read_checkpoint_index(folder).tensors) == set(keys)
    assert load_model(str(folder)).model is not None


# Run in a subprocess with a timeout: opening a FIFO blocks until a writer appears, so a regression
# hangs there instead of failing here.
_NON_REGULAR_SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys
    from pathlib import Path
    from normsurgeon.errors import InputError
    from normsurgeon.io.checkpoint import check_folder
    from normsurgeon.stream.headers import read_checkpoint_index
    src, work = Path(sys.argv[1]), Path(sys.argv[2])
    def folder(name, weight, make):
        d = work / name
        d.mkdir()
        shutil.copy(src / "config.json", d)
        make(d / weight)
        return d
    def index(d):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard.safetensors"}}))
    cases = {
        "fifo": (folder("fifo", "model.safetensors", os.mkfifo), [check_folder, read_checkpoint_index]),
        "directory": (folder("directory", "model.safetensors", os.mkdir), [check_folder, read_checkpoint_index]),
        "device": (folder("device", "model.safetensors", lambda p: p.symlink_to("/dev/zero")),
                   [check_folder, read_checkpoint_index]),
        "fifo_shard": (folder("fifo_shard", "shard.safetensors", os.mkfifo), [check_folder, read_checkpoint_index]),
        "fifo_index": (folder("fifo_index", "model.safetensors.index.json", os.mkfifo),
                       [check_folder, read_checkpoint_index]),
        "fifo_pickle": (folder("fifo_pickle", "pytorch_model.bin", os.mkfifo),
                        [lambda d: check_folder(d, allow_pickle=True)]),
    }
    index(work / "fifo_shard")
    from normsurgeon.io.loader import load_model
    fifo_config = work / "fifo_config"
    shutil.copytree(src, fifo_config)
    (fifo_config / "config.json").unlink()
    os.mkfifo(fifo_config / "config.json")
    cases["fifo_config"] = (fifo_config, [lambda d: load_model(str(d)), check_folder])
    for name, (d, reads) in cases.items():
        for read in reads:
            try:
                read(d)
                print(json.dumps([name, "accepted", ""]), flush=True)
            except InputError as e:
                print(json.dumps([name, "InputError", str(e)]), flush=True)
""")


@pytest.fixture(scope="module")
def non_regular_results(gpt2_safetensors, tmp_path_factory):
    work = tmp_path_factory.mktemp("nonregular")
    try:
        proc = subprocess.run([sys.executable, "-c", _NON_REGULAR_SCRIPT, str(gpt2_safetensors), str(work)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        done = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"reading a non-regular weight file blocked (a FIFO was opened); finished before it: {done}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results: dict[str, list] = {}
    for line in proc.stdout.splitlines():
        name, outcome, message = json.loads(line)
        results.setdefault(name, []).append((outcome, message))
    return results


@pytest.mark.parametrize("case", ["fifo", "directory", "device", "fifo_shard", "fifo_index", "fifo_pickle",
                                  "fifo_config"])
def test_non_regular_weight_files_are_refused_unopened(non_regular_results, case):
    outcomes = non_regular_results[case]
    assert outcomes
    for outcome, message in outcomes:
        assert outcome == "InputError" and "not a regular file" in message and "\n" not in message, outcomes


# --- 5. safetensors headers validated like the safetensors library ------------------------------------

def _craft(path: Path, header, data: bytes = b"") -> Path:
    """Write 8-byte length + header (a JSON-able object, or raw bytes) + data, by hand."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(begin: int, end: int, shape=(1,)) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


_A = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
REJECTED = {  # name: (header, data, the tensor the message must name, or None)
    "overlap": ({"a": _f32(0, 4), "b": _f32(0, 4)}, bytes(8), "b"),
    "partial_overlap": ({"a": _f32(0, 8, (2,)), "b": _f32(4, 8)}, bytes(8), "b"),
    "gap": ({"a": _f32(0, 4), "b": _f32(8, 12)}, bytes(12), "b"),
    "not_from_zero": ({"a": _f32(4, 8)}, bytes(8), "a"),
    "negative_offset": ({"a": _f32(-4, 0)}, bytes(4), "a"),
    "reversed_offsets": ({"a": _f32(4, 0)}, bytes(4), "a"),
    "three_offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, bytes(4), "a"),
    "string_offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, bytes(4), "a"),
    "null_offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": None}}, bytes(4), "a"),
    "no_data_offsets": ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4), "a"),
    "no_shape": ({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, bytes(4), "a"),
    "no_dtype": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4), "a"),
    "unknown_dtype": ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "a"),
    "lowercase_dtype": ({"a": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "a"),
    "bytes_not_numel_x_itemsize": ({"a": _f32(0, 4, (2,))}, bytes(4), "a"),
    "float_dim": ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, bytes(4), "a"),
    "bool_dim": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "a"),
    "negative_dim": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "a"),
    "shape_not_a_list": ({"a": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}, bytes(4), "a"),
    "dim_beyond_u64": ({"a": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 4]}}, bytes(4), "a"),
    "numel_overflows_before_a_zero_dim": (
        {"a": {"dtype": "F32", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}}, b"", "a"),
    "entry_not_an_object": ({"a": 5}, b"", "a"),
    "header_is_an_array": (b"[]", b"", None),
    "header_is_a_string": (b'"x"', b"", None),
    "metadata_not_strings": ({"__metadata__": {"k": 1}, "a": _f32(0, 4)}, bytes(4), None),
    "metadata_a_list": ({"__metadata__": [], "a": _f32(0, 4)}, bytes(4), None),
    "trailing_data": ({"a": _f32(0, 4)}, bytes(8), None),
    "truncated_data": ({"a": _f32(0, 4)}, bytes(2), None),
    "nan_in_header": (_A[:-1] + b',"x":NaN}}', bytes(4), None),
    "invalid_utf8": (b'{"a\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4), None),
    "utf8_bom": (b"\xef\xbb\xbf" + _A + b"}", bytes(4), None),
    "trailing_garbage": (_A + b"}x", bytes(4), None),
    "empty_header": (b"", b"", None),
}
ACCEPTED = {
    "plain": ({"a": _f32(0, 4)}, bytes(4)),
    "no_tensors": ({}, b""),
    "zero_sized_tensors_share_an_offset": ({"a": _f32(0, 0, (0,)), "b": _f32(0, 0, (0, 3)), "c": _f32(0, 4)},
                                           bytes(4)),
    "out_of_order_keys": ({"b": _f32(4, 8), "a": _f32(0, 4)}, bytes(8)),
    "metadata": ({"__metadata__": {"format": "pt"}, "a": _f32(0, 4)}, bytes(4)),
    "null_metadata": ({"__metadata__": None, "a": _f32(0, 4)}, bytes(4)),
    "extra_entry_field": ({"a": dict(_f32(0, 4), note=1)}, bytes(4)),
    "space_padding": (_A + b"}    ", bytes(4)),
}


def _library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:  # noqa: BLE001 - the library's own error type; any error is a rejection
        return False


@pytest.mark.parametrize("case", REJECTED)
def test_bad_header_is_refused_by_both_paths_and_the_library(tmp_path, case):
    header, data, tensor = REJECTED[case]
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    file = _craft(folder / "model.safetensors", header, data)
    assert not _library_accepts(file), "the safetensors library accepts this file"
    for read in (read_header, lambda _: read_checkpoint_index(folder), lambda _: check_folder(folder)):
        with pytest.raises(InputError) as e:
            read(file)
        message = _one_line(e)
        assert message.startswith("model.safetensors"), message
        if tensor is not None:
            assert f"tensor {tensor!r}" in message, message


@pytest.mark.parametrize("case", ACCEPTED)
def test_valid_header_is_accepted_like_the_library(tmp_path, case):
    header, data = ACCEPTED[case]
    file = _craft(tmp_path / "model.safetensors", header, data)
    assert _library_accepts(file)
    entries = read_header(file)
    with safe_open(str(file), framework="pt") as f:
        assert set(entries) == set(f.keys())
        for k, e in entries.items():
            assert torch.equal(read_tensor(e), f.get_tensor(k))


@pytest.mark.parametrize("code", ["F4", "F8_E8M0", "C64"])
def test_dtypes_torch_cannot_convert_are_refused_by_name(tmp_path, code):
    """The one disagreement: the library parses these, normsurgeon refuses them (no torch dtype to convert)."""
    nbytes = {"F4": 1, "F8_E8M0": 1, "C64": 8}[code]
    shape = [2] if code == "F4" else [1]
    file = _craft(tmp_path / "model.safetensors", {"a": {"dtype": code, "shape": shape, "data_offsets": [0, nbytes]}},
                  bytes(nbytes))
    assert _library_accepts(file)
    with pytest.raises(InputError) as e:
        read_header(file)
    assert f"unsupported dtype {code!r}" in _one_line(e)


def test_library_written_file_with_fp8_and_unsigned_ints_parses(tmp_path):
    wanted = ["float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "uint8", "uint16", "uint32",
              "uint64", "int8", "int64", "bool"]
    dtypes = [getattr(torch, n) for n in wanted if hasattr(torch, n)]
    assert {"F8_E4M3", "F8_E5M2"} <= set(DTYPES)
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": (torch.rand(3, 5, generator=gen) * 50).to(dt) for i, dt in enumerate(dtypes)}
    tensors["scalar"] = torch.tensor(1.5)
    file = tmp_path / "model.safetensors"
    try:
        save_file(tensors, str(file), metadata={"format": "pt"})
    except (TypeError, ValueError) as e:  # an older safetensors without the unsigned ints
        pytest.skip(f"this safetensors cannot write every dtype: {e}")
    entries = read_header(file)
    assert set(entries) == set(tensors)
    for k, t in tensors.items():
        assert entries[k].dtype == t.dtype and entries[k].shape == tuple(t.shape)
        assert torch.equal(read_tensor(entries[k]).reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


def _overlap_two_tensors(file: Path) -> str:
    """Rewrite ``file``'s header so that one tensor reads another's bytes; returns the moved tensor's name."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    by_size: dict[int, str] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        size = info["data_offsets"][1] - info["data_offsets"][0]
        if size in by_size:
            header[name]["data_offsets"] = list(header[by_size[size]]["data_offsets"])
            _craft(file, header, data)
            return name
        by_size[size] = name
    raise AssertionError("no two tensors of equal size")


def test_cli_stream_no_verify_refuses_overlapping_offsets(gpt2_safetensors, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(gpt2_safetensors, src)
    moved = _overlap_two_tensors(src / "model.safetensors")
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    for extra in (["--stream", "--no-verify"], ["--no-verify"]):
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "-m", "normsurgeon.cli", "convert", str(src), "-o", str(out), *extra],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                              cwd=tmp_path)
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("· ")]  # progress lines
        assert proc.returncode == 5 and len(lines) == 1, (extra, proc.returncode, proc.stderr)
        assert lines[0].startswith("error:") and "model.safetensors" in lines[0] and moved in lines[0], lines
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], extra  # nothing written, not even staging
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
