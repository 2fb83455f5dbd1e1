"""Every config key, with the original recipe's values (docs/original.md, "Training recipe").

The other config files start from `get_config()` here and change what differs, so each key has
one definition and one default. Override any key from the command line: --config.batch_size=512.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    # model
    c.arch = "resnet18_bwx2"
    c.num_classes = 1000
    c.dtype = "float32"  # computation dtype: float32 | bfloat16 (params/optimizer stay float32)
    c.act_backend = "auto"  # ternary activation: auto (= xla, faster in the models) | triton | xla
    c.remat = "off"  # on: recompute BatchNorm, activations and PReLU in the backward pass instead
    # of storing them (less memory, ~9 % slower on an H200) | off | auto (on, except on the CPU,
    # whose XLA compiler undoes it)
    c.inference_dtype = "float"  # evaluation: float (in config.dtype) | int8 (merged ternary
    # models: int8 activations and kernels, exact int32 sums)
    c.stem_conv = "conv"  # the 7x7 stem convolution (student and teacher) as: conv |
    # space_to_depth (a 4x4 convolution over 12 channels) | im2col (a matrix product): the same
    # sums, other GPU kernels (docs/performance.md)
    # data (TFDS)
    c.dataset = "imagenet2012"
    c.data_dir = ""  # TFDS data dir; "" = TFDS default (~/tensorflow_datasets)
    c.train_split = "train"
    c.eval_split = "validation"
    c.image_size = 224  # a multiple of 32 (the STTN ResNet-18 halves its map 5 times)
    c.resize_size = 256  # shorter side before the crop (bicubic), as torchvision Resize(256)
    c.random_flip = True  # RandomHorizontalFlip in training (off for digits)
    c.input_mode = "exact"  # training transforms: exact (PIL's pixels) | fast (2x, for GPU hosts);
    # evaluation is always exact
    c.fabricate_data = False  # smoke tests: fabricate a tiny ImageNet in data_dir on first use
    c.shuffle_buffer = 16384
    c.data_shards = 0  # training split read as this many shards; 0 = one per process. The batch
    # stream depends on it, not on the process count: fix it (e.g. to the largest host count
    # you use) to get the same batches on 1, 2, 4, ... hosts, and resume on another count.
    # optimisation
    c.batch_size = 256  # global, over all devices and processes
    c.eval_batch_size = 128
    c.num_epochs = 256
    c.num_train_steps = -1  # -1: num_epochs * steps per epoch
    c.learning_rate = 0.005
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.weight_decay = 0.0
    # distillation
    c.teacher_arch = "resnet50"
    c.teacher_checkpoint = ""  # torchvision ResNet-50 .pth or a converted checkpoint; "" -> CE on labels
    c.teacher_bn_train_mode = True  # the original runs the teacher in train mode
    c.sync_batch_stats = True  # BatchNorm statistics over the global batch (= one device)
    # bookkeeping
    c.seed = 0
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.eval_every_epochs = 1
    c.log_every_steps = 50
    c.progress_bar = True
    c.profile_steps = 0  # > 0: a profiler trace of this many steps for TensorBoard (from step 10)
    c.skip_nonfinite_steps = False  # False: stop at a non-finite loss; True: skip such steps
    return c
