"""Training: the loop, the per-model trainers, AdamW as the reference, checkpoints, metrics."""
