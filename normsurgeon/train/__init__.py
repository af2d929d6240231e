"""Reusable fine-tuning machinery: data, a loop on accelerate, checkpoints and resume, spike back-off."""
