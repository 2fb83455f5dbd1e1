"""The original recipe on a TPU slice of 16 chips (e.g. v5litepod-16 or v4-32: 4 hosts).

256 images per chip, under half of a v5e's 16 GiB in XLA's plan (`make tpu-plan`), so it fits
every TPU generation; on another slice keep it: --config.batch_size=$((256 * CHIPS))
--config.eval_batch_size=$((256 * CHIPS)). Adam's learning rate scales with the square root of the
batch ratio. Every host runs the same command, data_dir and workdir shared (docs/tpu.md).
"""
from configs import default

BATCH_PER_CHIP = 256
CHIPS = 16


def get_config():
    c = default.get_config()
    c.batch_size = BATCH_PER_CHIP * CHIPS
    c.eval_batch_size = BATCH_PER_CHIP * CHIPS
    c.learning_rate = 0.005 * (c.batch_size / 256) ** 0.5
    c.dtype = "bfloat16"
    c.act_backend = "xla"
    c.checkpoint_every_steps = 500
    return c
