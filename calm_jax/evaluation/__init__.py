"""Evaluation: BrierLM, autoencoder reconstruction, the quality-vs-compute frontier and plots."""
