"""Name generalisation: a plan made on the probe (k blocks) becomes the plan of the full model (L blocks).

Probe block j < k-1 is block j; the probe's last block stands for blocks k-1..L-1. ``check_alike``
refuses models whose blocks need different steps (block 0 vs the probe's last block), since then one
block cannot speak for the rest.

>>> exp = Expander({"h": 2}, {"h": 4})
>>> exp("h.0.attn"), exp("h.1.attn"), exp("wte")
(['h.0.attn'], ['h.1.attn', 'h.2.attn', 'h.3.attn'], ['wte'])
"""
from __future__ import annotations

import dataclasses

from normsurgeon.errors import UnsupportedModel
from normsurgeon.stream.skeleton import split_block
from normsurgeon.transforms.plan import RmsPlan


class Expander:
    """Maps probe names to full names: probe block j < k-1 is block j; probe block k-1 stands for k-1..L-1."""

    def __init__(self, probe_lists: dict[str, int], full_lists: dict[str, int]):
        self.probe, self.full = probe_lists, full_lists

    def __call__(self, name: str) -> list[str]:
        hit = split_block(name, self.probe)
        if hit is None:
            return [name]
        lst, j = hit
        k, n = self.probe[lst], self.full.get(lst, self.probe[lst])
        rest = name[len(lst) + 1 + len(str(j)):]
        if k == n or j < k - 1:
            return [name]
        return [f"{lst}.{i}{rest}" for i in range(j, n)]

    def template(self, name: str) -> tuple[str, tuple]:
        hit = split_block(name, self.probe)
        if hit is None:
            return name, ()
        lst, j = hit
        return f"{lst}.{{i}}" + name[len(lst) + 1 + len(str(j)):], (lst, j)


def check_alike(plan: RmsPlan, exp: Expander) -> None:
    """Blocks the probe represents by its last block must look like the probe's first block."""
    items = [("replace", n) for n in plan.replace] + [("center", n, k) for n, k in plan.center] + \
            [("fold", f.norm, tuple(r for r in f.readers), f.fold_gain, f.fold_shift) for f in plan.folds] + \
            [("bake", n, t) for n, t in plan.bake] + [("untie", r, w) for r, w in plan.untie] + \
            [("scale", w, g) for w, g in plan.layer_scales.items()]
    def flat(x) -> list[str]:
        return [x] if isinstance(x, str) else [y for part in x for y in flat(part)] if isinstance(x, tuple) else []

    def templ(x):
        return exp.template(x)[0] if isinstance(x, str) else tuple(templ(y) for y in x) if isinstance(x, tuple) else x

    per_block: dict[tuple, set] = {}
    for f in plan.folds:  # a norm outside the blocks read in several (an encoder's final norm, cross-attention)
        if exp.template(f.norm)[1] == () and len({exp.template(r)[1] for r, _ in f.readers} - {()}) > 1:
            items.remove(("fold", f.norm, tuple(r for r in f.readers), f.fold_gain, f.fold_shift))
            for r, lay in f.readers:
                block = exp.template(r)[1]
                if block:
                    per_block.setdefault(block, set()).add(repr(("cross-fold", f.norm, templ(r), lay)))
    for item in items:
        names = flat(item[1:])
        blocks = {exp.template(n)[1] for n in names} - {()}
        if len(blocks) > 1:
            raise UnsupportedModel(f"a plan step spans two blocks ({', '.join(names)}): streaming needs block-local steps")
        if blocks:
            per_block.setdefault(blocks.pop(), set()).add(repr(templ(item)))
    for lst, k in exp.probe.items():
        if k < 2 or exp.full.get(lst, k) == k:
            continue
        if per_block.get((lst, 0), set()) != per_block.get((lst, k - 1), set()):
            raise UnsupportedModel(f"the blocks of {lst} are not all alike (block 0 and block {k - 1} need different "
                                   "steps): streaming cannot generalise the plan; convert in memory")


def expand_plan(plan: RmsPlan, exp: Expander) -> RmsPlan:
    def one(name: str) -> list[str]:
        return exp(name)

    def pairs(items):
        out = []
        for a, b in items:
            xs, ys = one(a), one(b)
            out.extend(zip(xs, ys) if len(xs) == len(ys) else [(x, b) for x in xs] if len(ys) == 1 else [])
        return out

    folds = []
    for f in plan.folds:
        norms = one(f.norm)
        reader_lists = [one(r) for r, _ in f.readers]
        if len(norms) == 1:  # one norm (outside the blocks): every expanded reader reads it
            readers = [(r, lay) for rl, (_, lay) in zip(reader_lists, f.readers) for r in rl]
            folds.append(dataclasses.replace(f, norm=norms[0], readers=readers))
            continue
        for i, norm in enumerate(norms):
            readers = [(rl[i] if len(rl) == len(norms) else rl[0], lay) for rl, (_, lay) in zip(reader_lists, f.readers)]
            folds.append(dataclasses.replace(f, norm=norm, readers=readers))
    return RmsPlan(plan.target, plan.bias_policy, plan.hidden_size, pairs(plan.untie), pairs(plan.bake),
                   [(n2, k) for n, k in plan.center for n2 in one(n)], folds,
                   {n2: eps for n, eps in plan.replace.items() for n2 in one(n)}, [], [], [], [],
                   layer_scales=dict(pairs(plan.layer_scales.items())),
                   recentre=[n2 for n in plan.recentre for n2 in one(n)])
