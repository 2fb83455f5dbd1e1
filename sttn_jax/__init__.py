"""sttn-jax: Soft Threshold Ternary Networks (Xu et al., 2020) in JAX/Flax."""
from importlib import metadata

try:  # pyproject.toml sets it
    __version__ = metadata.version("sttn-jax")
except metadata.PackageNotFoundError:  # a checkout never installed
    __version__ = "unknown"
