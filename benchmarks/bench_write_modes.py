"""Write the same bytes through the page cache and with O_DIRECT (``stream/direct_writer.py``), alternately.

Each write goes to a new file after ``sync``, in a fresh process, as the streaming conversion's shards
do; the time includes opening, writing and closing.

    python benchmarks/bench_write_modes.py /work/bench --mb 650 --rounds 6
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
from normsurgeon.stream.direct_writer import BufferedFile, open_direct
n = {mb} * 2**20
data = torch.randint(0, 255, (n,), dtype=torch.uint8).numpy()  # touched before the timer
path = {path!r}
t = time.perf_counter()
f = open_direct(path, n, True) if {direct} else BufferedFile(path, n, True)
assert f is not None, "this file system refuses O_DIRECT"
step = 8 * 2**20 + 12345  # unaligned pieces, as tensors are
for off in range(0, n, step):
    f.write(memoryview(data[off:off + step]), off)
f.close()
print(time.perf_counter() - t)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--mb", type=int, default=650)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    times: dict[str, list[float]] = {"buffered": [], "direct": []}
    for i in range(a.rounds):
        for mode in times:
            path = a.folder / f"write-test-{mode}-{i}.bin"
            subprocess.run(["sync"], check=True)
            code = _CHILD.format(root=str(ROOT), mb=a.mb, path=str(path), direct=mode == "direct")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            times[mode].append(float(out.stdout.strip()))
            path.unlink()
    res = {m: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs": v,
               "median_MBps": a.mb * 2**20 / 1e6 / statistics.median(v)} for m, v in times.items()}
    print(json.dumps({"mb": a.mb, "rounds": a.rounds, **res}, indent=1))


if __name__ == "__main__":
    main()
