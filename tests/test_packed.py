"""The packed model file (`sttn_jax.packed`): merged resnet18_ter models at 2 bits per ternary
weight, read back bit for bit; damaged files refused with CheckpointError naming the file."""
import io
import json
import os
import pickle

import jax
import numpy as np
import pytest

from sttn_jax import merging, packed
from sttn_jax.errors import CheckpointError
from tests.test_int8 import random_bwx2_variables


@pytest.fixture(scope="module")
def merged10():
    return merging.merge_variables(random_bwx2_variables(10, seed=0, zero_fraction=0.01))


@pytest.fixture(scope="module")
def merged1000():
    return merging.merge_variables(random_bwx2_variables(1000, seed=1, zero_fraction=0.0))


@pytest.fixture(scope="module")
def packed_file(merged10, tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "model.sttn"
    packed.write(path, merged10, meta={"source": "test", "top1": 0.5})
    return path


def assert_same(a, b):
    """Same tree, dtypes, shapes and bytes."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        x = np.asarray(x)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def shapes(tree):
    return jax.tree_util.tree_map(lambda a: (np.asarray(a).dtype, np.shape(a)), tree)


# --------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("classes", [10, 1000])
def test_round_trip_is_bit_exact(classes, merged10, merged1000, tmp_path):
    variables = merged10 if classes == 10 else merged1000
    path = tmp_path / "m.sttn"
    assert packed.write(path, variables, meta={"classes": classes}) == path
    back, arch, meta = packed.read(path)
    assert (arch, meta) == ("resnet18_ter", {"classes": classes})
    assert_same(variables, back)
    assert packed.is_packed_file(path)
    size, payload = path.stat().st_size, sum(packed.payload_breakdown(variables).values())
    float32 = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(variables))
    print(f"{classes} classes: file {size:,d} B, payload_bytes {payload:,d} B, "
          f"float32 {float32:,d} B")
    assert payload <= size <= payload * 1.01
    assert sorted(os.listdir(tmp_path)) == ["m.sttn"]  # no temporary file left


def test_half_levels_round_trip(merged10, packed_file):
    with np.load(packed_file) as archive:
        assert archive["half_signs"].size > 0  # +-alpha weights present, one sign bit each
    back, _, _ = packed.read(packed_file)
    kernel = back["params"]["features_6"]["conv1"]["kernel"]
    alpha = np.abs(kernel).max(axis=(0, 1, 2)) / 2
    assert np.any(np.abs(kernel) == alpha)  # the +-alpha level itself, exactly


def test_write_replaces_atomically(merged10, merged1000, tmp_path, monkeypatch):
    path = tmp_path / "m.sttn"
    packed.write(path, merged10)
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        packed.write(path, merged1000)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["m.sttn"]


# --------------------------------------------------------------------------------------------
# refusals


def refused(path, match=None):
    with pytest.raises(CheckpointError, match=match) as info:
        packed.read(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_write_refuses_what_it_cannot_store(merged10, tmp_path):
    path = tmp_path / "m.sttn"
    bad = jax.tree_util.tree_map(np.array, merged10)
    kernel = bad["params"]["features_9"]["conv2"]["kernel"]
    kernel[0, 0, 0, 0] = 0.3 * np.abs(kernel[..., 0]).max()  # not a multiple of alpha
    for variables, match in [
            (bad, r"features_9/conv2/kernel is not a ternary kernel.*merge"),
            (random_bwx2_variables(10), "not a merged resnet18_ter model.*merge")]:
        with pytest.raises(CheckpointError, match=match) as info:
            packed.write(path, variables)
        assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="resnet18_ter models, not resnet50"):
        packed.write(path, merged10, arch="resnet50")
    with pytest.raises(CheckpointError, match="not written: .*not JSON serializable"):
        packed.write(path, merged10, meta={"x": object()})
    assert not path.exists() and os.listdir(tmp_path) == []


def rewritten(path, data: bytes, **changes) -> bytes:
    """`data` (a packed file) with some archive members replaced: a file whose zip is intact but
    whose content lies."""
    with np.load(io.BytesIO(data)) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays.update(changes)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_damaged_files_are_refused(packed_file, tmp_path):
    data = packed_file.read_bytes()
    path = tmp_path / "bad.sttn"

    def case(content, match="not a readable packed model file"):
        path.write_bytes(content)
        return refused(path, match)

    for cut in (0, 3, 100, len(data) // 2, len(data) - 1):
        case(data[:cut])
    case(np.random.default_rng(0).bytes(4096))
    case(pickle.dumps({"params": {}}))
    with np.load(io.BytesIO(data)) as archive:
        header = json.loads(archive["header"].tobytes())
        codes, floats = archive["codes"], archive["float32"]
    as_bytes = lambda h: np.frombuffer(json.dumps(h).encode(), np.uint8)  # noqa: E731
    case(rewritten(path, data, header=as_bytes({**header, "version": 9})), "format version 9")
    case(rewritten(path, data, header=as_bytes({**header, "arch": "resnet50"})), "not a packed")
    case(rewritten(path, data, header=as_bytes({**header, "num_classes": 11})), "fit a 11-class")
    case(rewritten(path, data, codes=codes[:-1]), "codes")
    case(rewritten(path, data, float32=floats.astype(np.float64)), "dtypes")
    case(rewritten(path, data, float32=floats[:-1]), "float32")
    refused(tmp_path / "missing.sttn", "no such file")
    refused(tmp_path, "not a readable packed model file")
    assert not packed.is_packed_file(tmp_path / "missing.sttn")


def test_random_damage_never_escapes_as_another_error(packed_file, tmp_path):
    """Flipped bytes and truncations: each read either gives the right shapes or CheckpointError."""
    data = packed_file.read_bytes()
    expected = shapes(packed.read(packed_file)[0])
    rng = np.random.default_rng(7)
    path = tmp_path / "mutated.sttn"
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(200):
        mutated = bytearray(data)
        if i % 4 == 3:
            del mutated[int(rng.integers(0, len(data))):]
        else:  # half of the flips where the structure lives: the zip directory at the end
            start = len(data) - 1024 if i % 2 else 0
            for _ in range(int(rng.integers(1, 4))):
                mutated[int(rng.integers(start, len(data)))] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(mutated))
        try:
            variables, _, _ = packed.read(path)
        except CheckpointError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
        else:
            assert shapes(variables) == expected
            outcomes["loaded"] += 1
    print("random damage:", outcomes)
    assert outcomes["refused"] > 0
