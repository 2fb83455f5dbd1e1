"""The original recipe on a TPU slice of 16 chips (e.g. v5litepod-16 or v4-32: 4 hosts).

Batch: 256 images per chip (BATCH_PER_CHIP), global 4096. The per-chip batch is sized by XLA's plan
of this config's steps compiled for TPU slices (`make tpu-plan`, docs/performance.md): the bfloat16
training step with its ResNet-50 teacher holds under half of the 16 GiB of the chip with the least
memory, a v5e, so the same per-chip batch fits every TPU generation with room to spare (the
temporaries grow with the batch: doubling it would come close to a v5e's limit). On a slice of
another size keep the batch per chip and set the global batch (and the learning rate, below) to
match: --config.batch_size=$((256 * CHIPS)) --config.eval_batch_size=$((256 * CHIPS)).

Learning rate: Adam's scaled with the square root of the batch ratio to the original's 256,
0.005 * sqrt(4096 / 256) = 0.02 (scale it with the batch if you change it). bfloat16 compute
(float32 parameters and statistics); the ternary activation through XLA (the Triton backend is for
CUDA GPUs). Every host runs the same command; each reads its own shard of the TFDS split from a
data_dir all hosts share (a GCS bucket), and the workdir must be shared too (docs/tpu.md).
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
