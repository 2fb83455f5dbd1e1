"""The architectures by name, the STTN ResNet-18's blocks, and the rules for what each takes, as
`*_problem` functions (None, or why not and what fits): configs, flags and modules refuse alike."""

from sttn_jax.errors import ConfigError
from sttn_jax.convolutions import CONV_FORMS

BWX2, TERNARY, TEACHER = "resnet18_bwx2", "resnet18_ter", "resnet50"
ARCHS = {
    BWX2: "STTN ResNet-18 with binary weight pairs, as trained",
    TERNARY: "STTN ResNet-18 with the pairs merged into ternary weights",
    TEACHER: "torchvision's ResNet-50, the distillation teacher",
}
TRAINABLE = (BWX2, TERNARY)  # train.py's students (resnet18_ter as a plain network)
# (in, out, stride) of the STTN ResNet-18's 8 BasicBlocks features.4 ... features.11.
RESNET18_BLOCKS = ((64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
                   (256, 256, 1), (256, 512, 2), (512, 512, 1))
FIRST_BLOCK_INDEX = 4
MIN_IMAGE_SIZE = 32


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def image_size_problem(side: int, arch: str = BWX2) -> str | None:
    """Why `arch` cannot take images `side` pixels high or wide, naming sides that fit; None if it
    can (every model halves the image five times; the STTN ResNet-18 has `odd_map_problem` too)."""
    if side < MIN_IMAGE_SIZE:
        return (f"images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} (the network "
                f"downsamples 32x), a side of {side} is less; multiples of 32 fit, e.g. 32 or 64")
    return None if arch == TEACHER else odd_map_problem(side)


def odd_map_problem(side: int) -> str | None:
    """Why the STTN ResNet-18 cannot take images of `side`, else None: a stride-2 block adds its
    conv's output (half, rounded up) to its max-pool shortcut (rounded down): no odd side but 3."""
    m = -(-side // 4)  # the stem's stride-2 convolution and max pool each round the half up
    for *_, stride in RESNET18_BLOCKS:
        if stride == 2:
            if m % 2 and m != 3:
                near = [k for k in (side // 32 * 32, side // 32 * 32 + 32) if k >= MIN_IMAGE_SIZE]
                return (f"a side of {side} reaches a stride-2 block as {m} pixels, which its "
                        f"convolution halves to {m // 2 + 1} and its max-pool shortcut to "
                        f"{m // 2}; multiples of 32 fit, e.g. {' or '.join(map(str, near))}")
            m = -(-m // 2)
    return None


def check_images(x, arch: str) -> None:
    """Refuses what is not a batch of NHWC RGB images of sides `arch` takes, naming the fix."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected NHWC images with 3 channels (batch, height, width, 3), got shape "
                         f"{tuple(x.shape)}; transpose NCHW input with x.transpose(0, 2, 3, 1)")
    for side in x.shape[1:3]:
        if problem := image_size_problem(side, arch):
            raise ValueError(f"images of {x.shape[1]}x{x.shape[2]}: {problem}")


def stem_conv_problem(stem_conv: str) -> str | None:  # the stem's convolution: a CONV_FORMS key
    return None if stem_conv in CONV_FORMS else f"choose one of {', '.join(CONV_FORMS)}"


def inference_dtype_problem(arch: str, inference_dtype: str | None) -> str | None:
    """Why `arch` has no model of `inference_dtype`: int8 is the merged ternary model's alone."""
    if inference_dtype not in (None, "float", "int8"):  # None and "float": the same model
        return "choose 'float' (or None, the same) or 'int8'"
    if inference_dtype == "int8" and arch != TERNARY:
        return (f"int8 runs merged ternary models ('{TERNARY}'), not {arch!r}; merge the "
                f"{BWX2} model first (merge.py), or use the float model")
    return None
