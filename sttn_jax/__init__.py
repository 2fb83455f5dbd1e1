"""sttn-jax: Soft Threshold Ternary Networks (Xu et al., 2020) in JAX/Flax."""
__version__ = "0.1.0"
