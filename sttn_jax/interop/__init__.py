"""PyTorch <-> JAX interop: the original STTN checkpoints, and parity with a PyTorch reference.

- `load_torch_checkpoint(path, arch=None)` -> Flax variables {"params", "batch_stats"}
- `save_torch_checkpoint(variables, arch, path)` -> a .pth.tar the original code loads unchanged
- `gradients_to_torch_state_dict(grads, arch)` -> {torch parameter name: tensor}
- `interop.reference`: the PyTorch reference of the original models, BinOp and training step
- `interop.parity`: logits of both frameworks on one batch, compared
- `python -m sttn_jax.interop {convert,export,parity}`

torch is imported only inside functions: importing this package does not need it.
"""
from sttn_jax.interop.names import infer_arch
from sttn_jax.interop.torch_io import load_torch_checkpoint, read_state_dict, state_dict_to_variables
from sttn_jax.interop.torch_save import (gradients_to_torch_state_dict, save_torch_checkpoint,
                                         variables_to_state_dict)

__all__ = ["load_torch_checkpoint", "save_torch_checkpoint", "gradients_to_torch_state_dict",
           "variables_to_state_dict", "state_dict_to_variables", "read_state_dict", "infer_arch"]
