"""The original recipe on one host: STTN ResNet-18 (bwx2), distillation from ResNet-50, Adam 0.005,
per-epoch cosine over 256 epochs, global batch 256, the original augmentation.

Set the teacher: --config.teacher_checkpoint=/path/resnet50-0676ba61.pth
"""
from configs import default


def get_config():
    return default.get_config()
