"""The original recipe on a TPU pod slice (e.g. v4-32: 16 chips over 4 hosts).

Scaling written down: global batch 4096 (256 per chip); Adam's learning rate scaled with the square
root of the batch ratio, 0.005 * sqrt(16) = 0.02; bfloat16 compute (float32 parameters and
statistics); the ternary activation through XLA (Triton is CUDA-only). Every host runs the same
command; each reads its own shard of the TFDS split from a shared data_dir (e.g. a GCS bucket).
"""
from configs import default


def get_config():
    c = default.get_config()
    c.batch_size = 4096
    c.eval_batch_size = 4096
    c.learning_rate = 0.02
    c.dtype = "bfloat16"
    c.act_backend = "xla"
    c.checkpoint_every_steps = 500
    return c
