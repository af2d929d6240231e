"""Per-layer diagnostics of a causal LM: activations, gradients, angular distances, layer removal, spikes."""
