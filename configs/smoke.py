"""Tiny and fast: a fabricated 4-class ImageNet (made in data_dir on first use through the real
TFDS imagenet2012 builder), 32x32 crops, no teacher, a few steps. Runs on a fresh CPU machine:

  python train.py --config configs/smoke.py --workdir /tmp/smoke
"""
from configs import default


def get_config():
    c = default.get_config()
    c.num_classes = 1000  # the imagenet2012 label space; only 4 classes are present
    c.data_dir = "runs/smoke_data"
    c.fabricate_data = True
    c.image_size = 32
    c.resize_size = 36
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_epochs = 2
    c.num_train_steps = -1
    c.shuffle_buffer = 64
    c.teacher_checkpoint = ""
    c.checkpoint_every_steps = 2
    c.keep_checkpoints = 2
    c.eval_every_epochs = 1
    c.log_every_steps = 1
    return c
