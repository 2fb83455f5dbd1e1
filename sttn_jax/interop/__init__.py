"""PyTorch <-> JAX interop: the original STTN checkpoints, the PyTorch reference of the original,
logit parity with it, and `python -m sttn_jax.interop`. Importing it does not import torch."""
from sttn_jax.interop.names import infer_arch
from sttn_jax.interop.torch_io import (load_torch_checkpoint, read_state_dict,
                                       state_dict_to_variables)
from sttn_jax.interop.torch_save import (gradients_to_torch_state_dict, save_torch_checkpoint,
                                         variables_to_state_dict)

__all__ = ["load_torch_checkpoint", "save_torch_checkpoint", "gradients_to_torch_state_dict",
           "variables_to_state_dict", "state_dict_to_variables", "read_state_dict", "infer_arch"]
