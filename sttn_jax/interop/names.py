"""PyTorch state_dict keys <-> Flax variable paths, computed from the abstract Flax variable tree
(torch is not imported). The models name their modules after the PyTorch ones, with `_` where
PyTorch has `.` before an index: params/features_4/conv1/kernel_1 <-> features.4.conv1_1.weight.
"""

import dataclasses
import functools
import re

from sttn_jax import archs, model_trees

# How an array is laid out on each side (COUNT: num_batches_tracked, int32 <-> int64 scalar).
CONV, DENSE, VECTOR, COUNT = "conv", "dense", "vector", "count"
TORCH_AXES = {CONV: (3, 2, 0, 1), DENSE: (1, 0)}  # Flax -> torch transposes; others: the same
PARAMS, BATCH_STATS = "params", "batch_stats"
# Flax leaf name -> torch tensor name (the leaves that are not kernels or pair members).
_LEAF_NAMES = {"bias": "bias", "scale": "weight", "slope": "weight", "mean": "running_mean",
               "var": "running_var", "num_batches_tracked": "num_batches_tracked"}
_PAIR_LEAF = re.compile(r"^(kernel|bias)_(\d+)$")  # kernel_1, bias_2 ... of a BinaryPairConv
_INDEXED_MODULE = re.compile(r"^(.*)_(\d+)$")       # features_4, layer1_0, downsample_1


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: its torch key (without the `module.` prefix) and its place in the Flax tree."""
    torch_key: str
    collection: str          # "params" or "batch_stats"
    path: tuple[str, ...]    # path inside the collection
    kind: str                # CONV, DENSE, VECTOR or COUNT
    flax_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]


def torch_module_name(flax_module: str) -> str:
    """`features_4` -> `features.4`, `layer1_0` -> `layer1.0`; `bn_add1`, `conv1` unchanged."""
    m = _INDEXED_MODULE.match(flax_module)
    return f"{m.group(1)}.{m.group(2)}" if m else flax_module


def _entry(collection: str, path: tuple[str, ...], shape: tuple[int, ...]) -> Entry:
    *modules, leaf = path
    torch_modules = [torch_module_name(m) for m in modules]
    pair = _PAIR_LEAF.match(leaf)
    if pair:  # BinaryPairConv: conv1/kernel_1 -> conv1_1.weight
        what, member = pair.groups()
        torch_modules[-1] = f"{modules[-1]}_{member}"
        torch_leaf = "weight" if what == "kernel" else "bias"
        kind = CONV if what == "kernel" else VECTOR
    elif leaf == "kernel" and len(shape) in (2, 4):
        torch_leaf = "weight"
        kind = CONV if len(shape) == 4 else DENSE
    elif leaf in _LEAF_NAMES:
        torch_leaf = _LEAF_NAMES[leaf]
        kind = COUNT if leaf == "num_batches_tracked" else VECTOR
    else:
        raise ValueError(f"no PyTorch name for Flax leaf {collection}/{'/'.join(path)}")
    key = ".".join(torch_modules + [torch_leaf])
    shape = tuple(int(d) for d in shape)
    axes = TORCH_AXES.get(kind, range(len(shape)))
    return Entry(key, collection, tuple(path), kind, shape, tuple(shape[i] for i in axes))


@functools.lru_cache(maxsize=None)
def entries(arch: str, num_classes: int = 1000) -> tuple[Entry, ...]:
    """Every tensor of `arch`, in the Flax tree's order (params, then batch_stats)."""
    archs.check_arch(arch)
    return tuple(_entry(key.split("/")[0], tuple(key.split("/")[1:]), tuple(leaf.shape))
                 for key, leaf in model_trees.variable_shapes(arch, num_classes).items())


def by_torch_key(arch: str, num_classes: int = 1000) -> dict[str, Entry]:
    return {e.torch_key: e for e in entries(arch, num_classes)}


# A key in exactly one arch each (the resnet50 one also in torchvision's other ResNets).
SIGNATURE_KEYS = {"resnet18_bwx2": "features.4.conv1_1.weight",
                  "resnet18_ter": "features.4.conv1.weight", "resnet50": "layer1.0.conv1.weight"}
# torchvision ResNets by (blocks per stage, bottleneck blocks).
TORCHVISION_RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                       ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
                       ((3, 8, 36, 3), True): "resnet152"}


def torchvision_resnet(keys) -> str | None:
    """Which torchvision ResNet a state_dict (prefix stripped) holds, from its blocks, else None."""
    keys = list(keys)
    blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")})
                   for i in range(1, 5))
    return TORCHVISION_RESNETS.get((blocks, any(".conv3." in k for k in keys)))


def infer_arch(keys) -> str | None:
    """The arch whose signature key is among `keys` (prefix stripped), else None; resnet50 also
    needs its block layout (its key is in every torchvision ResNet)."""
    keys = set(keys)
    found = [arch for arch, key in SIGNATURE_KEYS.items() if key in keys]
    if len(found) != 1 or (found[0] == "resnet50" and torchvision_resnet(keys) != "resnet50"):
        return None
    return found[0]
