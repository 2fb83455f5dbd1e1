"""sttn-jax: Soft Threshold Ternary Networks (Xu et al., 2020) in JAX/Flax."""
from importlib import metadata

try:
    __version__ = metadata.version("sttn-jax")  # pyproject.toml's, the one place it is set
except metadata.PackageNotFoundError:  # a checkout used without installing it
    __version__ = "unknown"
