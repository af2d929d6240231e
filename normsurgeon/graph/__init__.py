"""Dataflow tracing and the norm map (which norms exist, who reads them, who writes the residual)."""
