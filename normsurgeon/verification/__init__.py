"""Compare a converted model with its source: inputs, metrics, the run, and the report."""
