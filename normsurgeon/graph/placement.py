"""Blocks (the children of every ModuleList) and the norm placement of each block.

Placement names: pre-ln, parallel (GPT-J/NeoX/Phi/Falcon: every pre norm reads the block input),
post-ln, peri-ln (pre + output norms), output-norm-only, none, or mixed(...).
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class BlockInfo:
    name: str
    norms: list[str]
    writers: list[str]
    placement: str


def find_blocks(model: torch.nn.Module) -> list[str]:
    """Names of the children of every ModuleList that holds modules (the model's repeated blocks)."""
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            names.extend(f"{name}.{i}" for i in range(len(mod)))
    return names


def block_of(name: str, blocks: list[str]) -> str | None:
    best = None
    for b in blocks:
        if name.startswith(b + ".") and (best is None or len(b) > len(best)):
            best = b
    return best


def block_placements(blocks, norms, writers) -> list[BlockInfo]:
    out = []
    if not blocks:  # no ModuleList: treat the model as one block (without its embedding and final norms)
        blocks = [""]
    for b in blocks:
        if b:
            bnorms = [n for n in norms if n.block == b and n.role != "inner"]
            bwriters = [w.name for w in writers if block_of(w.name, [b]) == b]
        else:
            bnorms = [n for n in norms if n.role not in ("inner", "final", "embedding")]
            bwriters = [w.name for w in writers if w.kind not in ("embedding", "param")]
        if not bnorms and not bwriters:
            continue
        roles = sorted({n.role for n in bnorms})
        if "final" in roles and len(roles) > 1:  # Post-LN's last norm doubles as the final norm
            roles.remove("final")
        pre_inputs = {n.input_node for n in bnorms if n.role == "pre"}
        if not bnorms:
            placement = "none"
        elif roles == ["pre"]:
            placement = "parallel" if len(pre_inputs) == 1 and len(bwriters) >= 2 else "pre-ln"
        elif roles == ["post"]:
            placement = "post-ln"
        elif roles == ["output", "pre"]:
            placement = "peri-ln"
        elif roles == ["output"]:
            placement = "output-norm-only"
        else:
            placement = "mixed(" + "+".join(roles) + ")"
        out.append(BlockInfo(b, [n.name for n in bnorms], bwriters, placement))
    return out
