"""Memory-bounded conversion of large checkpoints: plan from headers, stream group by group, resume,
and verify layer by layer. See ``plan.py``, ``pipeline.py``, ``execute.py``, ``shards.py`` and ``layerwise_verify.py``."""
from normsurgeon.stream.pipeline import stream_convert
from normsurgeon.stream.layerwise_verify import verify_layerwise
from normsurgeon.stream.plan import StreamPlan, check_budget, plan_streaming

__all__ = ["StreamPlan", "check_budget", "plan_streaming", "stream_convert", "verify_layerwise"]
