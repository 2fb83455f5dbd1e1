"""The original recipe on 8 GPUs of one host at global batch 1024, Adam's learning rate scaled with
the square root of the batch ratio (the linear rule is too hot for Adam). For the original's
numbers on 8 GPUs pass --config.batch_size=256 --config.learning_rate=0.005.
"""
from configs import default


def get_config():
    c = default.get_config()
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.learning_rate = 0.01
    c.dtype = "bfloat16"
    return c
