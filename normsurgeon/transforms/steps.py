"""The named steps of a Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm conversion, in their standard order.

A recipe lists the steps it runs (``recipes.Recipe.steps``); the engine's job builder
(``stream/jobs.py``) turns the listed ones into per-tensor operations, in this order.

>>> DEFAULT_STEPS["crmsnorm"][-1]
'shrink_residual'
"""
from __future__ import annotations

STEPS = (
    "untie_tied_readers",  # a reader sharing its weight with a writer (tied lm_head) gets its own copy
    "bake_embedding_norms",  # an embedding norm over one table becomes the table (BLOOM)
    "fold_norm_affine",  # each norm's gain and shift move into the layers that read it
    "center_writers",  # every residual writer's output is made zero-mean (layer scales folded first)
    "replace_norms",  # the norms become RMSNorm / CRMSNorm
    "shrink_residual",  # CRMSNorm: drop the redundant last residual coordinate
)
DEFAULT_STEPS = {
    "rmsnorm": list(STEPS[:5]),
    "crmsnorm": list(STEPS),
}
