"""calm_jax: Continuous Autoregressive Language Models (Shao et al., 2025) in JAX/Flax."""

__version__ = "0.1.0"
