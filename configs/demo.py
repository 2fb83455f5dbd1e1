"""`make demo`: STTN ResNet-18 (bwx2) on the embedded `sttn_digits` set (built into data_dir on
first use), cross-entropy on labels (no teacher offline). A few minutes on 2 CPU cores.
"""
from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "sttn_digits"
    c.data_dir = "runs/demo_data"
    c.train_split = "train"
    c.eval_split = "test"
    c.num_classes = 10
    c.image_size = 32
    c.resize_size = 32
    c.random_flip = False  # a mirrored digit is another digit
    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_epochs = 4
    c.learning_rate = 0.005
    c.shuffle_buffer = 2048
    c.teacher_checkpoint = ""
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 1
    c.eval_every_epochs = 1
    c.log_every_steps = 5
    return c
