#!/usr/bin/env python
"""The support matrix: every zoo architecture (tests/model_zoo.py ``ZOO``) x every recipe that applies to it,
run through the real CLI, written to docs/support.md (generated) and benchmarks/results/support_matrix.json.

Each model is built tiny with randomised weights, norms, biases, BN statistics and layer scales, saved to a
temporary folder, and given to ``python -m normsurgeon.cli RECIPE ...`` in a subprocess (HF_HUB_OFFLINE=1,
one thread) with a per-run timeout, ``--jobs`` at a time. Each run is classified from its exit code, its one
stderr error line and its report:

  exact     exit 0, verified, every LayerNorm converted, nothing kept on a norm        ✓ exact
  kept      exit 0, verified, some norm keeps its gain/shift (report plan.kept_on_norm)  ~ kept: N
  partial   exit 0, verified, but some LayerNorms of the source were left as they were ◐ N/M LN
  ok        exit 0 (recipes other than convert), with the report's headline number      ✓ ...
  refused   exit 4, with the one-line reason                                             ✗ refused: ...
  usage / input   exit 2 / exit 5                                                         ✗ usage 2 / input 5
  verify    exit 3: the CLI's own verification caught a wrong result                     ✗ verify 3
  internal  exit 1: an internal error (rerun with NORMSURGEON_DEBUG=1 for the place)    ERR 1
  resource / diverged / timeout / other

Usage:
  python benchmarks/support_matrix.py                       # everything, 2 jobs -> docs/support.md
  python benchmarks/support_matrix.py --only gpt2,whisper --recipes convert,inspect --out /tmp/s.md
  python benchmarks/support_matrix.py --only whisper --merge  # rerun cells, merge into the last results
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # support_matrix_lib, also when loaded by path (tests)

from support_matrix_lib import DOC, GENERATED_MARK, REGENERATE, RESULTS, ROOT  # noqa: E402
from support_matrix_lib.cells import corpus_text, layer_norm_names, prepare  # noqa: E402
from support_matrix_lib.classify import classify  # noqa: E402
from support_matrix_lib.render import print_summary, render, summary  # noqa: E402
from support_matrix_lib.runs import run_cell, versions  # noqa: E402
from model_zoo import KINDS, RECIPES, ZOO  # noqa: E402

__all__ = ["DOC", "GENERATED_MARK", "REGENERATE", "RESULTS", "ROOT", "classify", "layer_norm_names", "main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", help="comma-separated zoo names (default: all)")
    ap.add_argument("--kinds", help="comma-separated kinds: " + ",".join(KINDS))
    ap.add_argument("--recipes", help="comma-separated recipes (default: all that apply): " + ",".join(RECIPES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--out", default=str(DOC), help="the Markdown matrix (default docs/support.md)")
    ap.add_argument("--json", default=str(RESULTS), help="raw results (default benchmarks/results/...)")
    ap.add_argument("--merge", action="store_true", help="merge these runs into the existing --json results")
    ap.add_argument("--no-debug-errors", action="store_true", help="do not rerun exit-1 cases for a traceback")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--render", action="store_true", help="only rewrite --out from the --json results (no runs)")
    a = ap.parse_args(argv)
    if a.render:
        data = json.loads(Path(a.json).read_text())
        Path(a.out).write_text(render(data["results"], data["meta"]))
        print_summary(data["results"])
        return 0
    names = a.only.split(",") if a.only else list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        ap.error(f"not in the zoo: {', '.join(unknown)}")
    if a.kinds:
        names = [n for n in names if ZOO[n].kind in a.kinds.split(",")]
    recipes = a.recipes.split(",") if a.recipes else list(RECIPES)
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        ap.error(f"unknown recipes: {', '.join(bad)}")
    cells = [(n, r) for n in names for r in recipes if ZOO[n].applies(r)]
    work = Path(tempfile.mkdtemp(prefix="support-matrix-"))
    text = work / "text.txt"
    corpus = corpus_text()
    text.write_text(corpus)
    t0 = time.time()
    start_versions = versions()
    print(f"{len(cells)} runs over {len(names)} architectures, {a.jobs} jobs, work folder {work}", flush=True)
    preps, results = {}, []
    for n in names:
        try:
            preps[n] = prepare(n, [r for (m, r) in cells if m == n], work)
        except Exception as e:  # noqa: BLE001 - a zoo entry that does not build is reported, not fatal
            print(f"  {n}: does not build: {type(e).__name__}: {e}", flush=True)
            for (m, r) in cells:
                if m == n:
                    results.append({"name": n, "recipe": r, "kind": ZOO[n].kind, "rc": None, "cls": "other",
                                    "cell": "✗ build", "error": f"zoo build failed: {type(e).__name__}: {e}",
                                    "wall_s": 0.0, "command": ""})
    todo = [(n, r) for (n, r) in cells if n in preps]
    try:
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            futs = {pool.submit(run_cell, n, r, preps[n], work, str(text), a.timeout, not a.no_debug_errors): (n, r)
                    for n, r in todo}
            for i, f in enumerate(as_completed(futs), 1):
                r = f.result()
                results.append(r)
                print(f"[{i}/{len(todo)}] {r['name']:26s} {r['recipe']:12s} {r['cls']:9s} {r['wall_s']:6.1f}s  "
                      f"{r['cell']}" + (f"  | {r['error'][:160]}" if r.get("error") and r["cls"] != "ok" else ""),
                      flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.time() - t0
    subset = ", ".join(x for x in (f"--only {a.only}" if a.only else "", f"--kinds {a.kinds}" if a.kinds else "",
                                   f"--recipes {a.recipes}" if a.recipes else "") if x)
    json_path = Path(a.json)
    end_git = versions()["git"]
    git_end = end_git if end_git != start_versions["git"] else None
    if a.merge and json_path.is_file():
        old = json.loads(json_path.read_text())
        start_versions, git_end = old["meta"]["versions"], old["meta"].get("git_end")
        fresh = {(r["name"], r["recipe"]) for r in results}
        results = [r for r in old["results"] if (r["name"], r["recipe"]) not in fresh and r["name"] in ZOO] + results
        subset = f"merged ({subset}) into the run of {old['meta']['date']}" if subset else ""
        wall = old["meta"]["wall_s"] + wall
    order = {(n, r): i for i, (n, r) in enumerate((n, r) for n in ZOO for r in RECIPES)}
    results.sort(key=lambda r: order.get((r["name"], r["recipe"]), 0))
    meta = {"date": _dt.date.today().isoformat(), "versions": start_versions, "git_end": git_end, "jobs": a.jobs,
            "wall_s": round(wall, 1),
            "timeout_s": a.timeout, "subset": subset, "text_chars": len(corpus),
            "build_s": {n: p["build_s"] for n, p in preps.items()}}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "summary": summary(results), "results": results}, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(render(results, meta))
    print_summary(results)
    print(f"\n{len(results)} runs in {wall:.0f} s; wrote {a.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
