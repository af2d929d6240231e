"""Memory-bounded conversion of large checkpoints: plan from headers, stream group by group, resume.
See ``plan.py``, ``pipeline.py``, ``execute.py`` and ``shards.py``; the layer-by-layer verification is
``verification/layerwise.py``."""
from normsurgeon.stream.pipeline import stream_convert
from normsurgeon.stream.plan import StreamPlan, check_budget, plan_streaming

__all__ = ["StreamPlan", "check_budget", "plan_streaming", "stream_convert"]
