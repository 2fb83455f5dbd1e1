"""Test setup and shared fixtures: 8 simulated CPU devices (for shard_map tests), TensorFlow kept
quiet, one persistent XLA compilation cache for the session (the tests build the same networks
many times, also in the CLI subprocesses and pytest-xdist workers they start, which inherit these
variables; removed when the session ends), the smoke data and training runs (built once even with
several workers), original-format PyTorch checkpoints, and torch's global generator seeded for each
test."""
import atexit
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # this process starts the session: it owns it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sttn-jax-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:  # Triton before anything imports TensorFlow (see sttn_jax/data/tf_import.py)
    import triton  # noqa: E402, F401
except ImportError:
    pass

from tests.ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]


def has_cuda_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


requires_gpu = pytest.mark.skipif(not has_cuda_gpu(), reason="needs a CUDA GPU")  # in ALLOWED_SKIPS


@contextlib.contextmanager
def seeded_torch(seed=0):
    """torch's global generator seeded inside the block and restored after it: what a test draws
    from it (the default init of layers the tests do not set, such as biases) is the same in
    every run, so a failure reproduces."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test that runs where torch is imported runs under seeded_torch()."""
    if "torch" not in sys.modules:
        yield
        return
    with seeded_torch():
        yield


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory):
    """Temporary files of the code under test and of the commands it starts go under pytest's own
    temporary directory, which pytest prunes after three sessions: TFDS leaves an empty directory
    in the system's for every builder made of a data set not yet prepared (six in test_data.py)."""
    path = str(tmp_path_factory.mktemp("tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", path)
        patch.setattr(tempfile, "tempdir", path)
        yield


@pytest.fixture
def x64():
    """Runs a test with float64 enabled (parity checks), restoring the setting afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


# -- command-line tools ---------------------------------------------------------------------------


def run_cli(script, *args, timeout=300, **kwargs):
    """`python SCRIPT ARGS` from the repository root (XLA_FLAGS, 8 devices, comes from above)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, *(["-m", script] if "." in script and not script.endswith(".py")
                             else [script]), *map(str, args)]
    return subprocess.run(cmd, cwd=kwargs.pop("cwd", REPO), env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def assert_one_error_line(r, code=2) -> str:
    """The tool exited with `code`, no traceback, and its last stderr line is its one error."""
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-3000:]
    return errors[0]


def pytest_collection_modifyitems(items):
    """Tests marked `long` run first: with parallel workers (make test runs pytest-xdist) the
    suite then does not end waiting on one of them."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable


# -- the smoke data and training runs -------------------------------------------------------------


def built_once(tmp_path_factory, name, build) -> Path:
    """A directory `name` that `build(path)` fills once per test session: pytest-xdist workers
    share the parent of their temporary directories, and the first to take the lock builds
    while the others wait and reuse it (a failed build is redone by the next)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory):
    """The fabricated tiny ImageNet of configs/smoke.py, prepared once per test session through
    the real TFDS imagenet2012 builder."""
    from sttn_jax.data import fabricate

    return str(built_once(tmp_path_factory, "smoke_data",
                          lambda d: fabricate.ensure_fake_imagenet(str(d))))


def smoke_config(data_dir, **overrides):
    """configs/smoke.py reading `data_dir`, without a progress bar, with `overrides` applied."""
    from configs import smoke

    c = smoke.get_config()
    c.data_dir = data_dir
    c.progress_bar = False
    for k, v in overrides.items():
        c[k] = v
    return c


# The smoke run that tests compare against: 6 steps = 2 epochs of 3 (an evaluation, a best
# checkpoint and an epoch boundary on the way), a checkpoint after every step.
SMOKE_RUN = dict(num_train_steps=6, checkpoint_every_steps=1, keep_checkpoints=2)


@pytest.fixture(scope="session")
def uninterrupted_smoke_run(smoke_data_dir, tmp_path_factory):
    """(result, workdir) of one uninterrupted in-process SMOKE_RUN on the 8 simulated devices;
    interrupted runs of the same config must end with the same checkpoint, bit for bit."""
    from sttn_jax import train_loop

    workdir = built_once(tmp_path_factory, "uninterrupted", lambda w: train_loop.train_and_evaluate(
        smoke_config(smoke_data_dir, **SMOKE_RUN), w))
    return json.loads((workdir / "final_metrics.json").read_text()), workdir


@pytest.fixture(scope="session")
def smoke_workdir(smoke_data_dir, tmp_path_factory):
    """A real training workdir: 3 steps = one epoch; checkpoints/ keeps 2 and 3 (the best)."""
    from sttn_jax import train_loop

    def train(w):
        assert train_loop.train_and_evaluate(smoke_config(smoke_data_dir, num_train_steps=3), w)["step"] == 3

    return built_once(tmp_path_factory, "smoke_workdir", train)


@pytest.fixture(scope="session")
def merged_smoke(smoke_workdir, tmp_path_factory):
    """merge_checkpoint (merge.py's library entry point) of smoke_workdir: a resnet18_ter model
    checkpoint with its merge report."""
    from sttn_jax import merging

    out = tmp_path_factory.mktemp("merged") / "ter"
    return merging.merge_checkpoint(smoke_workdir, out, echo=lambda line: None)


def latest_checkpoint(workdir):
    """(state as a dict of numpy arrays, meta) of the newest checkpoint in workdir/checkpoints."""
    import orbax.checkpoint as ocp

    from sttn_jax import checkpoints

    manager = checkpoints.manager(Path(workdir) / checkpoints.LATEST, 100)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def assert_float64_runs_agree(one, other, bias_atol=5e-9, rtol=1e-8):
    """Two float64 train states that differ only in summation order (device or process count)
    agree: integers exactly, every float leaf within `rtol` of its largest magnitude.

    Block-conv biases are compared on an absolute scale: they feed a BatchNorm, so their gradient
    is rounding noise (~1e-17), which Adam (eps 1e-8) turns into ~lr * noise / eps steps; 5e-9 is
    1e-6 of an Adam step. Those ~1e-10 offsets feed the next steps, and Adam's normalisation
    amplifies rounding in near-zero gradients: measured about 2e-9 to 6e-9 after 3 steps, where a
    real mismatch (a wrong batch, a missing mean) is 1e-4 or more. Returns the worst relative error.
    """
    assert jax.tree_util.tree_structure(one) == jax.tree_util.tree_structure(other)
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree_util.tree_leaves(other)):
        a, b = np.asarray(a), np.asarray(b)
        key = jax.tree_util.keystr(path)
        assert a.dtype == b.dtype, key
        if a.dtype.kind != "f":
            np.testing.assert_array_equal(a, b, err_msg=key)
            continue
        assert a.dtype == np.float64, f"{key} is {a.dtype}: not a float64 run"
        if "conv" in key and key.endswith("['bias']"):
            np.testing.assert_allclose(b, a, rtol=0, atol=bias_atol, err_msg=key)
        else:
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300)))
    assert worst <= rtol, worst
    return worst


# -- original-format PyTorch checkpoints ----------------------------------------------------------

ZEROED = 10  # latent weights set exactly to 0 in bwx2_pth: +-alpha levels


def bwx2_reference_model(seed=0):
    """The original's bwx2 as main.py leaves it after some training: Normal(0, 1/fan_in) init,
    BatchNorm affine, statistics and PReLU away from their init, latent weights of every size
    (some beyond the clamp, which the merge must apply), ZEROED of them exactly 0."""
    import torch

    from sttn_jax.interop import reference
    from tests import reference_training

    g = torch.Generator().manual_seed(seed)
    with seeded_torch(seed):
        model = reference_training.init_like_original(reference.build("resnet18_bwx2"), g)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.6, 1.4, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                m.running_mean.normal_(0.0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.num_batches_tracked.fill_(1234)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.0, 0.5, generator=g)
        for w in reference.BinOp(model).target_modules:
            w.normal_(0.0, 0.6, generator=g)
        model.features[4].conv1_1.weight.view(-1)[:ZEROED] = 0.0
    return model


def save_original(model, path, arch):
    """torch.save as main.py does: nn.DataParallel keys in a full training checkpoint."""
    import torch

    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 7, "arch": arch, "state_dict": sd, "best_prec1": 0.0, "optimizer": {}}, path)
    return path


@pytest.fixture(scope="session")
def bwx2_pth(tmp_path_factory):
    pytest.importorskip("torch")
    return save_original(bwx2_reference_model(), tmp_path_factory.mktemp("pth") / "bwx2.pth.tar",
                         "resnet18_bwx2")


@pytest.fixture(scope="session")
def ter_pth(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from sttn_jax.interop import reference
    from tests import reference_training

    with seeded_torch(1):
        model = reference_training.init_like_original(reference.build("resnet18_ter"),
                                             torch.Generator().manual_seed(1))
    return save_original(model, tmp_path_factory.mktemp("pth") / "ter.pth.tar", "resnet18_ter")


# -- refusals before training -----------------------------------------------------------------


def trap(*args, **kwargs):
    raise AssertionError("training started: the bad input was not refused up front")


@pytest.fixture
def no_training(monkeypatch):
    """Makes creating a train state or compiling a step fail the test."""
    from sttn_jax import training

    monkeypatch.setattr(training, "create_train_state", trap)
    monkeypatch.setattr(training, "make_train_step", trap)


def one_line(exc: BaseException, capsys) -> str:
    """What the command-line tools print for `exc`: asserts it is one `error:` line and exit 2."""
    from sttn_jax import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        with cli.one_line_errors():
            raise exc
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def refused(config, workdir, error, match, capsys):
    """Runs train_and_evaluate expecting `error`; checks nothing was written for training and the
    one line the CLI prints. Returns that line."""
    from sttn_jax import train_loop

    with pytest.raises(error, match=match) as info:
        train_loop.train_and_evaluate(config, workdir)
    assert not (Path(workdir) / "checkpoints").exists()
    assert not (Path(workdir) / "config.json").exists()
    return one_line(info.value, capsys)
