"""Hostile files into every entry point that reads a model: eval.py, merge.py, the teacher of
train.py and `python -m sttn_jax.interop` (convert, export, parity: `model_io.load`). Each is
refused with one CheckpointError naming the file and the fix, which the tools print as one
`error:` line with exit status 2, and nothing is written.

Most cases run in process through the library functions the tools call and
`cli.one_line_errors`; a few subprocess runs show the tools end to end. The fuzz tests damage a
valid original .pth.tar, a model checkpoint directory and a packed file at random: each damaged
copy either loads as a usable model (the right tree and shapes, finite values) or is refused with
a CheckpointError naming it, never another exception, a crash or a hang."""
import concurrent.futures
import faulthandler
import functools
import re
import shutil
import struct
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from sttn_jax import evaluation, merging, model_io, models, packed, train_loop
from sttn_jax.archs import BWX2, TEACHER, TERNARY
from sttn_jax.errors import CheckpointError
from tests.conftest import assert_one_error_line, run_cli, smoke_config
from tests.test_int8 import random_bwx2_variables
from tests.test_train_loop import one_line, torchvision_resnet18_state_dict

torch = pytest.importorskip("torch")

NUM_CLASSES = 10
# The refusal each hostile file gets from the sources that accept any arch.
HOSTILE = {
    "truncated.pth": "truncated or damaged",
    "random.pth": "not a PyTorch checkpoint",
    "not_torch_zip.pth": "not one torch.save wrote",
    "torchvision_resnet18.pth": "a torchvision resnet18, which sttn-jax does not model",
    "some_tensors.pth": r"not a checkpoint of resnet18_bwx2 / resnet18_ter / resnet50 \(keys "
                        r"such as a, b.weight\)|does not match resnet\S+: missing keys",
    "nan.pth": "non-finite values",
    "inf_model": "non-finite values",
    "nan.sttn": "non-finite values",
    "wrong_shape.pth": "wrong shapes for resnet18_ter",
    "wrong_shape_model": r"not a resnet18_ter model .*features_5/conv1/kernel",
    "empty_dir": "neither a training workdir",
    "damaged_json_model": "sttn_model.json: damaged",
    "damaged_orbax_model": "cannot be restored",
}
# Where one arch is wanted, a file of another is refused for that first.
ANOTHER_ARCH = r"holds an? \S+ model"


def zero_variables(arch, num_classes=NUM_CLASSES):
    """`arch`'s variables, all zeros: only the layout matters here (eval_shape takes no time
    where init takes seconds)."""
    module = models.create(arch, num_classes)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                np.zeros((1, 32, 32, 3), np.float32), train=False))
    return {k: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes[k])
            for k in ("params", "batch_stats")}


def poisoned(variables, leaf: str, value):
    """A copy of `variables` with the first element of `leaf` (e.g. "params/fc/kernel") set to
    `value`."""
    out = jax.tree_util.tree_map(np.array, variables)
    functools.reduce(lambda tree, key: tree[key], leaf.split("/"), out).flat[0] = value
    return out


def shapes(tree):
    return jax.tree_util.tree_map(lambda a: (np.asarray(a).dtype, np.shape(a)), tree)


def model_dir_files(path):
    return sorted(p for p in Path(path).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def merged10():
    """A merged resnet18_ter of 10 classes with realistic bytes (ternary kernels, random rest)."""
    return merging.merge_variables(random_bwx2_variables(NUM_CLASSES, seed=0, zero_fraction=0.01))


@pytest.fixture(scope="module")
def good(merged10, tmp_path_factory):
    """Valid files to damage: a model checkpoint directory and a packed file of `merged10`."""
    d = tmp_path_factory.mktemp("good")
    return {"model": model_io.save(d / "model", merged10, TERNARY),
            "packed": packed.write(d / "model.sttn", merged10)}


@pytest.fixture(scope="module")
def hostile(ter_pth, merged10, tmp_path_factory):
    """{name: path} of the files of HOSTILE."""
    from sttn_jax import interop

    d = tmp_path_factory.mktemp("hostile")
    files = {name: d / name for name in HOSTILE}
    data = Path(ter_pth).read_bytes()
    files["truncated.pth"].write_bytes(data[:len(data) // 2])
    files["random.pth"].write_bytes(np.random.default_rng(0).bytes(4096))
    with zipfile.ZipFile(files["not_torch_zip.pth"], "w") as z:
        z.writestr("notes.txt", "not a model")
    torch.save(torchvision_resnet18_state_dict(), files["torchvision_resnet18.pth"])
    torch.save({"a": torch.zeros(3), "b.weight": torch.ones(2, 2)}, files["some_tensors.pth"])
    ter = zero_variables(TERNARY)
    interop.save_torch_checkpoint(poisoned(ter, "params/features_1/scale", np.nan), TERNARY,
                                  files["nan.pth"])
    model_io.save(files["inf_model"], poisoned(merged10, "params/fc/kernel", np.inf), TERNARY)
    packed.write(files["nan.sttn"], poisoned(merged10, "params/features_1/scale", np.nan))
    state_dict = interop.variables_to_state_dict(ter, TERNARY)
    state_dict["module.features.7.conv1.weight"] = torch.zeros(128, 128, 3, 2)
    torch.save({"state_dict": state_dict}, files["wrong_shape.pth"])
    wrong = jax.tree_util.tree_map(np.array, ter)
    wrong["params"]["features_5"]["conv1"]["kernel"] = np.zeros((3, 3, 64, 65), np.float32)
    model_io.save(files["wrong_shape_model"], wrong, TERNARY)
    files["empty_dir"].mkdir()
    model_io.save(files["damaged_json_model"], ter, TERNARY)
    (files["damaged_json_model"] / model_io.MODEL_METADATA).write_bytes(b'{"arch": "resnet18_t\xff')
    model_io.save(files["damaged_orbax_model"], merged10, TERNARY)
    biggest = max(model_dir_files(files["damaged_orbax_model"]), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100_000])  # a data file: the reads fail mid-flight
    return files


def refused(call, path, match, capsys) -> str:
    """Runs `call`, which must raise CheckpointError naming `path` and matching `match`; returns
    the line the tools print for it (checked: one `error:` line, exit status 2) with a fix."""
    with pytest.raises(CheckpointError, match=match) as info:
        call()
    assert str(path) in str(info.value)
    line = one_line(info.value, capsys)
    assert re.search(r"; \S", line), f"no fix in: {line}"
    return line


@pytest.fixture
def no_training(monkeypatch):
    def trap(*args, **kwargs):
        raise AssertionError("training started: the teacher was not refused up front")

    monkeypatch.setattr(train_loop, "_train", trap)


# --------------------------------------------------------------------------------------------
# every hostile file through every entry point


@pytest.mark.parametrize("name", HOSTILE)
def test_every_entry_point_refuses_it_in_one_line_and_writes_nothing(
        name, hostile, tmp_path, capsys, no_training):
    path, match = hostile[name], HOSTILE[name]
    config = smoke_config(str(tmp_path / "no_data"))
    # convert, export, parity (without and with --arch) and eval.py
    refused(lambda: model_io.load(path), path, match, capsys)
    refused(lambda: model_io.load(path, arch=TERNARY), path, f"{match}|{ANOTHER_ARCH}", capsys)
    refused(lambda: evaluation.evaluate_checkpoint(config, path), path, match, capsys)
    # merge.py: no --out, --torch_out or --packed
    out = tmp_path / "out"
    refused(lambda: merging.merge_checkpoint(path, out / "merged", torch_out=out / "m.pth.tar",
                                             packed=out / "m.sttn", echo=lambda _: None),
            path, match, capsys)
    assert not out.exists()
    # the teacher of train.py: no checkpoints/ or config.json in the workdir
    workdir = tmp_path / "workdir"
    config.teacher_checkpoint = str(path)
    line = refused(lambda: train_loop.train_and_evaluate(config, workdir), path,
                   f"{match}|{ANOTHER_ARCH}", capsys)
    assert "config.teacher_checkpoint" in line
    assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


@pytest.fixture(scope="module")
def other_arch_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("other_arch")
    return {arch: model_io.save(d / arch, zero_variables(arch), arch) for arch in (BWX2, TEACHER)}


def test_a_model_of_another_arch_is_refused_where_one_arch_is_wanted(
        other_arch_models, tmp_path, capsys, no_training):
    """A resnet50 where a resnet18_ter is wanted (eval.py --arch, convert --arch: refused from its
    sttn_model.json, before its variables are read) or merged; a bwx2 as the teacher."""
    resnet50 = other_arch_models[TEACHER]
    config = smoke_config(str(tmp_path / "no_data"))
    match = "holds a resnet50 model, not resnet18_ter; ask for arch 'resnet50'"
    line = refused(lambda: model_io.load(resnet50, arch=TERNARY), resnet50, match, capsys)
    assert "pass --arch resnet50 or leave --arch out" in line  # the tools say it in their flag
    refused(lambda: evaluation.evaluate_checkpoint(config, resnet50, arch=TERNARY), resnet50,
            match, capsys)
    refused(lambda: merging.merge_checkpoint(resnet50, tmp_path / "out", echo=lambda _: None),
            resnet50, r"holds a resnet50 model \(the ResNet-50 teacher\), not resnet18_bwx2",
            capsys)
    assert not (tmp_path / "out").exists()
    bwx2 = other_arch_models[BWX2]
    config.teacher_checkpoint = str(bwx2)
    refused(lambda: train_loop.train_and_evaluate(config, tmp_path / "workdir"), bwx2,
            "holds a resnet18_bwx2 model but config.teacher_arch='resnet50'", capsys)
    assert not (tmp_path / "workdir" / "checkpoints").exists()


def test_the_tools_end_to_end(hostile, other_arch_models, tmp_path):
    """Each tool once: exit 2, one `error:` line that is the last line of stderr (no Orbax
    "Event loop is closed" reports after it), no traceback, nothing written."""
    out, teacher = tmp_path / "out", other_arch_models[BWX2]
    runs = [  # (source, what its error says, the command line)
        (hostile["nan.pth"], "non-finite values",
         ("eval.py", "--checkpoint", hostile["nan.pth"], "--out", out / "eval.json")),
        (hostile["truncated.pth"], "truncated or damaged",
         ("merge.py", "--checkpoint", hostile["truncated.pth"], "--out", out / "merged",
          "--torch_out", out / "m.pth.tar", "--packed", out / "m.sttn")),
        (hostile["damaged_orbax_model"], "cannot be restored",
         ("sttn_jax.interop", "convert", hostile["damaged_orbax_model"], out / "converted")),
        (teacher, "holds a resnet18_bwx2 model but config.teacher_arch='resnet50'",
         ("train.py", "--config", "configs/smoke.py", "--workdir", out / "workdir",
          f"--config.teacher_checkpoint={teacher}", f"--config.data_dir={tmp_path / 'no_data'}")),
    ]
    # All at once: 20 s instead of 35 s one after the other (measured on a busy 2-core machine).
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(lambda run: run_cli(*run[2]), runs))
    for (source, message, _), r in zip(runs, results):
        line = assert_one_error_line(r)
        assert str(source) in line and message in line, line
    assert not out.exists(), list(out.rglob("*"))


# --------------------------------------------------------------------------------------------
# fuzz: random damage loads as a usable model or is refused, never anything else


def load_or_refuse(path, expected, outcomes):
    """model_io.load(path): counts a usable model (expected tree and shapes, finite) or a
    CheckpointError naming `path`; any other exception fails the test. Returns the variables."""
    try:
        loaded = model_io.load(path)
    except CheckpointError as e:
        assert str(path) in str(e), str(e)
        outcomes["refused"] += 1
        return None
    assert shapes(loaded.variables) == expected
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(loaded.variables))
    outcomes["loaded"] += 1
    return loaded.variables


@pytest.fixture
def hang_guard():
    """Ends the test run with every thread's traceback if a load hangs (a crash shows the same)."""
    faulthandler.dump_traceback_later(240, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def overwrite(path, values: dict):
    """Sets the bytes of `path` at the positions `values` maps to their new values."""
    with open(path, "r+b") as f:
        for at, value in values.items():
            f.seek(at)
            f.write(bytes([value]))


def test_random_damage_to_an_original_pth(ter_pth, tmp_path, hang_guard):
    """200 damaged copies of an original resnet18_ter .pth.tar, a quarter each: truncated; 1-3
    bytes flipped in the zip's central directory; in the pickle (data.pkl, the first member); or
    anywhere (mostly tensor data, which torch.load itself reads without noticing). What loads is
    the original model, bit for bit: every member's CRC is checked before torch.load."""
    data = Path(ter_pth).read_bytes()
    original = model_io.load(ter_pth).variables
    expected = shapes(original)
    with zipfile.ZipFile(ter_pth) as z:
        pickle_end = z.infolist()[1].header_offset
    end_record = data.rfind(b"PK\x05\x06")
    directory = struct.unpack_from("<I", data, end_record + 16)[0]
    regions = [(directory, len(data)), (0, pickle_end), (0, len(data))]
    rng = np.random.default_rng(0)
    flipped, truncated = tmp_path / "flipped.pth.tar", tmp_path / "truncated.pth.tar"
    flipped.write_bytes(data)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(200):
        # Flips go into one copy and are undone after: rewriting 46 MB each time took 4 s more.
        flips = {}
        if i % 4 == 0:
            truncated.write_bytes(data[:int(rng.integers(0, len(data)))])
        else:
            low, high = regions[i % 4 - 1]
            flips = {int(rng.integers(low, high)): int(rng.integers(1, 256))
                     for _ in range(int(rng.integers(1, 4)))}
            overwrite(flipped, {at: data[at] ^ bits for at, bits in flips.items()})
        variables = load_or_refuse(flipped if flips else truncated, expected, outcomes)
        overwrite(flipped, {at: data[at] for at in flips})
        if variables is not None:
            for a, b in zip(jax.tree_util.tree_leaves(variables),
                            jax.tree_util.tree_leaves(original)):
                assert a.tobytes() == b.tobytes()
    print("damaged .pth.tar:", outcomes)
    assert outcomes["refused"] > 0


def damaged_copies(files, rng, n):
    """Yields n times after damaging one of `files` (1-3 flipped bytes, or truncated) in place;
    the file is restored before the next."""
    for _ in range(n):
        victim = files[int(rng.integers(0, len(files)))]
        original = victim.read_bytes()
        damaged = bytearray(original)
        if rng.integers(0, 3) == 0 or not damaged:
            del damaged[int(rng.integers(0, max(len(damaged), 1))):]
        else:
            for _ in range(int(rng.integers(1, 4))):
                damaged[int(rng.integers(0, len(damaged)))] ^= int(rng.integers(1, 256))
        victim.write_bytes(damaged)
        try:
            yield victim
        finally:
            victim.write_bytes(original)


def test_random_damage_to_a_model_checkpoint_directory(good, merged10, hang_guard):
    """50 damaged copies: any of its files (sttn_model.json, Orbax metadata, data) may be hit."""
    expected = shapes(merged10)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in damaged_copies(model_dir_files(good["model"]), np.random.default_rng(1), 50):
        load_or_refuse(good["model"], expected, outcomes)
    print("damaged model checkpoint directory:", outcomes)
    assert outcomes["refused"] > 0


def test_random_damage_to_a_packed_file(good, merged10, hang_guard):
    expected = shapes(merged10)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in damaged_copies([good["packed"]], np.random.default_rng(2), 50):
        load_or_refuse(good["packed"], expected, outcomes)
    print("damaged packed file:", outcomes)
    assert outcomes["refused"] > 0


LIBRARY_USER = """
import sys, time
from sttn_jax import checkpoints, model_io, training
from sttn_jax.errors import EXPECTED
from tests.conftest import smoke_config

model, workdir = sys.argv[1:]
config = smoke_config("unused")
abstract = training.abstract_train_state(config, training.make_mesh(), training.create_optimizer(
    config, training.learning_rate_fn(config, 3)))
for read in (lambda: model_io.load(model), lambda: checkpoints.read_variables(workdir, 3),
             lambda: checkpoints.restore_newest_good(checkpoints.manager(workdir, 2), abstract)):
    try:
        read()
    except EXPECTED as e:
        print(type(e).__name__, flush=True)
time.sleep(3)  # the reads in flight fail meanwhile: without the hook they print (test below)
"""


def test_a_failed_restore_in_a_library_users_process_prints_nothing_later(
        hostile, smoke_workdir, tmp_path):
    """A damaged model and a damaged training checkpoint, read through the library in a process
    of its own (no CLI): each read is refused, and the reads Orbax still had in flight print
    nothing when they fail later (before: hundreds of tracebacks, at random, of three kinds)."""
    workdir = tmp_path / "checkpoints"
    shutil.copytree(smoke_workdir / "checkpoints" / "3", workdir / "3")
    # every data file, the reads failing mid-flight: which of them hold the parameters (all that
    # read_variables reads) and which only Adam's moments is Orbax's choice, and varies by version
    for f in model_dir_files(workdir / "3" / "state"):
        if f.stat().st_size > 1_000_000:
            f.write_bytes(f.read_bytes()[:100_000])
    r = run_cli("-c", LIBRARY_USER, hostile["damaged_orbax_model"], workdir, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["CheckpointError", "CheckpointError", "ConfigError"], r.stdout
    for report in ("Traceback", "Exception ignored", "exception was never retrieved"):
        assert report not in r.stderr, r.stderr[-3000:]


ORPHANS_UNQUIETED = """
import sys, time
from sttn_jax import checkpoints, model_io
from sttn_jax.errors import CheckpointError

checkpoints.quiet_orphaned_reads = lambda: None  # what happens without it
for _ in range(3):  # a process without a report is rare; three in a row are rarer still
    try:
        model_io.load(sys.argv[1])
    except CheckpointError:
        print("CheckpointError", flush=True)
    time.sleep(1)
time.sleep(2)
"""


def test_without_quiet_orphaned_reads_a_failed_restore_prints_tracebacks_later(hostile):
    """The upstream behaviour `checkpoints.quiet_orphaned_reads` hides: Orbax's reads still in
    flight when a restore fails call into its closed event loop later ("Event loop is closed").
    When this fails, Orbax or TensorStore no longer leave such reads: remove the hook."""
    r = run_cli("-c", ORPHANS_UNQUIETED, hostile["damaged_orbax_model"], timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["CheckpointError"] * 3, r.stderr[-3000:]
    assert "Event loop is closed" in r.stderr, r.stderr[-3000:]
