"""Reading models (local folders, cached hub ids, factories) and writing checkpoints atomically."""
