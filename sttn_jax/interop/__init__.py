"""PyTorch <-> JAX interop: the original STTN checkpoints, and parity with a PyTorch reference.

- `load_torch_checkpoint(path, arch=None)` -> Flax variables {"params", "batch_stats"}
- `save_torch_checkpoint(variables, arch, path)` -> a .pth.tar the original code loads unchanged
- `gradients_to_torch_state_dict(grads, arch)` -> {torch parameter name: tensor}
- `interop.reference`: the PyTorch reference of the original models, BinOp and training step
- `interop.parity`: logits of both frameworks on one batch, compared
- `python -m sttn_jax.interop {convert,export,parity}`

torch is imported only inside functions: importing this package does not need it.
"""
from sttn_jax.checkpoints import CheckpointError
from sttn_jax.interop.names import infer_arch
from sttn_jax.interop.torch_io import (gradients_to_torch_state_dict, load_torch_checkpoint,
                                       load_torch_checkpoint_with_arch, read_state_dict,
                                       save_torch_checkpoint, state_dict_to_variables,
                                       variables_to_state_dict)


def load_variables(path, arch=None):
    """(variables, arch) from a model checkpoint directory (`sttn_jax.checkpoints.save_model`) or
    an original PyTorch checkpoint file."""
    from pathlib import Path

    from sttn_jax import checkpoints

    path = Path(path)
    if checkpoints.is_model_checkpoint(path):
        return checkpoints.load_model_checkpoint(path, arch)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory but not an sttn-jax model checkpoint (no "
                              f"{checkpoints.MODEL_METADATA}); give a model checkpoint directory "
                              "or a PyTorch .pth/.pth.tar file")
    return load_torch_checkpoint_with_arch(path, arch)


__all__ = ["CheckpointError", "load_torch_checkpoint", "load_torch_checkpoint_with_arch",
           "save_torch_checkpoint", "gradients_to_torch_state_dict", "variables_to_state_dict",
           "state_dict_to_variables", "read_state_dict", "infer_arch", "load_variables"]
