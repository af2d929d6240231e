"""Removing LayerNorm/RMSNorm by fine-tuning (fixed-scale schedule, or DyT), and exporting the result."""
