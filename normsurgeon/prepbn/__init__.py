"""PRepBN (SLAB, Guo et al. 2024): replace the LayerNorms of a Pre-LN transformer by RepBN with a progressive
LayerNorm -> RepBN blend during fine-tuning, recalibrate the BatchNorm statistics, and fold every RepBN
into the linear layers that read it (``normsurgeon prepbn``; see docs/prepbn.md)."""
