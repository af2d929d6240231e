"""Norm-placement surgery: rewrite a Pre-LN Llama- or GPT-2-family model into another placement scheme.

Entry points: ``normsurgeon.placement.run.run_place`` (load, rewrite, measure, write) and
``normsurgeon.placement.apply.place`` (in memory). Schemes and per-block specs: ``spec.py``.
"""
