"""Norm-placement surgery: rewrite a Pre-LN decoder (sequential or parallel blocks, separate or fused q/k/v)
into another placement scheme, on the anatomy read from its traced dataflow (``anatomy.py``).

Entry points: ``normsurgeon.placement.run.run_place`` (load, rewrite, measure, write) and
``normsurgeon.placement.apply.place`` (in memory). Schemes and per-block specs: ``spec.py``.
"""
