"""Bad input is refused up front, in one line that names the fix (issue 7, items 5 and 6).

A wrong teacher file, a dataset or split that does not exist and a workdir that cannot take
checkpoints must stop train.py before any training step: finding out after an epoch (or after the
first compile, with a shape error) wastes the run. A disk that fills up during training must stop
the run with the workdir and the fix named, and leave the earlier checkpoints usable. Every one of
these errors is a class `cli_support.one_line_errors` turns into exactly one `error: ...` line and
exit status 2.

Most tests call `train_loop.train_and_evaluate` in process with `training.Trainer` replaced by a
trap (`no_trainer`): a check that comes after the Trainer is built would come after the compile,
so the trap failing the test is the point. Two tests run train.py itself (slow: ~15 s each).
"""
import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sttn_jax import checkpoints, cli_support, models, preflight, run_checkpoints, train_loop, training
from sttn_jax.checkpoints import CheckpointError
from sttn_jax.data import pipeline
from tests.conftest import smoke_config

REPO = Path(__file__).resolve().parents[1]


def trainer_trap(*args, **kwargs):
    raise AssertionError("a Trainer was built: the bad input was not refused up front")


@pytest.fixture
def no_trainer(monkeypatch):
    """Makes building a Trainer fail the test: the input must be refused before it."""
    monkeypatch.setattr(training, "Trainer", trainer_trap)


def one_line(exc: BaseException, capsys) -> str:
    """What the command-line tools print for `exc`: asserts it is one `error:` line and exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        with cli_support.one_line_errors():
            raise exc
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def refused(config, workdir, error, match, capsys):
    """Runs train_and_evaluate expecting `error`; checks nothing was written for training and the
    one line the CLI prints. Returns that line."""
    with pytest.raises(error, match=match) as info:
        train_loop.train_and_evaluate(config, workdir)
    assert not (Path(workdir) / "checkpoints").exists()
    assert not (Path(workdir) / "config.json").exists()
    return one_line(info.value, capsys)


# --------------------------------------------------------------------------------------------
# 1. teacher checkpoint of the wrong arch


def torchvision_resnet18_state_dict():
    """The keys and shapes of torchvision's resnet18().state_dict() (torchvision is not a
    dependency): BasicBlocks, whose keys the resnet50 signature key also matches."""
    import torch

    sd = {}

    def bn(prefix, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{prefix}.{name}"] = torch.zeros(c)
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    sd["conv1.weight"] = torch.zeros(64, 3, 7, 7)
    bn("bn1", 64)
    cin = 64
    for layer, c in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            sd[f"{p}.conv1.weight"] = torch.zeros(c, cin, 3, 3)
            bn(f"{p}.bn1", c)
            sd[f"{p}.conv2.weight"] = torch.zeros(c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if block == 0 and cin != c:
                sd[f"{p}.downsample.0.weight"] = torch.zeros(c, cin, 1, 1)
                bn(f"{p}.downsample.1", c)
            cin = c
    sd["fc.weight"] = torch.zeros(1000, 512)
    sd["fc.bias"] = torch.zeros(1000)
    return sd


@pytest.fixture(scope="module")
def student_files(tmp_path_factory):
    """A resnet18_bwx2 of 10 classes as a model checkpoint and as an original-format .pth.tar,
    and a torchvision-layout resnet18 .pth: teachers of the wrong arch for the default resnet50."""
    pytest.importorskip("torch")
    import torch

    from sttn_jax import interop

    d = tmp_path_factory.mktemp("teachers")
    model = models.create("resnet18_bwx2", 10)
    images = np.zeros((1, 32, 32, 3), np.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
    # zeros: only the layout matters here, and eval_shape takes no time where init takes seconds
    variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    files = {"model_dir": checkpoints.save_model(d / "bwx2_model", variables, "resnet18_bwx2"),
             "pth": interop.save_torch_checkpoint(variables, "resnet18_bwx2", d / "bwx2.pth.tar")}
    torch.save(torchvision_resnet18_state_dict(), d / "resnet18-f37072fd.pth")
    files["torchvision"] = d / "resnet18-f37072fd.pth"
    return files


@pytest.mark.parametrize("source,found", [("model_dir", "resnet18_bwx2"),
                                          ("pth", "resnet18_bwx2"),
                                          ("torchvision", "resnet18")])
def test_teacher_of_the_wrong_arch_is_refused_before_training(
        source, found, student_files, smoke_data_dir, tmp_path, no_trainer, capsys):
    """The message names the arch in the file, the arch expected and both fixes. Before, a
    torchvision resnet18 got a list of missing/unexpected resnet50 keys, and the others a fix
    (`--arch`) that train.py has no flag for."""
    path = student_files[source]
    config = smoke_config(smoke_data_dir, teacher_checkpoint=str(path), teacher_arch="resnet50")
    line = refused(config, tmp_path / "w", CheckpointError,
                   f"holds a {found} model but config.teacher_arch='resnet50'", capsys)
    assert str(path) in line and "--config.teacher_checkpoint" in line
    assert "resnet50-0676ba61.pth" in line and "--arch " not in line
    if found in models.ARCHS:
        assert f"--config.teacher_arch={found}" in line


def test_teacher_with_other_classes_or_an_unknown_arch_is_refused(
        student_files, smoke_data_dir, tmp_path, no_trainer, capsys):
    """A teacher of the right arch but another class count would fail in the first compiled step
    with a shape error; an arch name that does not exist, at model creation."""
    config = smoke_config(smoke_data_dir, teacher_checkpoint=str(student_files["model_dir"]),
                          teacher_arch="resnet18_bwx2")
    line = refused(config, tmp_path / "w", CheckpointError,
                   "has 10 classes but config.num_classes=1000", capsys)
    assert "--config.num_classes=10" in line
    config = smoke_config(smoke_data_dir, teacher_checkpoint=str(student_files["pth"]),
                          teacher_arch="resnet34")
    refused(config, tmp_path / "w", preflight.ConfigError,
            r"config.teacher_arch='resnet34': choose one of .*--config.teacher_arch=resnet50",
            capsys)


# --------------------------------------------------------------------------------------------
# 2. missing dataset or split


@pytest.mark.parametrize("overrides,match,fix", [
    ({"train_split": "trian"}, r"config.train_split='trian' is not a split of imagenet2012",
     "--config.train_split=train"),
    ({"eval_split": "validaton"}, r"config.eval_split='validaton' is not a split of imagenet2012",
     "--config.eval_split=validation"),
])
def test_a_typo_in_a_split_is_refused_before_training(overrides, match, fix, smoke_data_dir,
                                                       tmp_path, no_trainer, capsys):
    """The eval split used to be opened only at the first evaluation, after an epoch of training;
    and an unknown split was a plain ValueError, a traceback on the command line."""
    line = refused(smoke_config(smoke_data_dir, **overrides), tmp_path / "w",
                   preflight.ConfigError, match, capsys)
    assert "['train', 'validation']" in line and line.endswith(fix)


def test_unknown_or_unprepared_dataset_is_refused_before_training(tmp_path, no_trainer, capsys):
    """A name TFDS does not know gives TFDS's multi-page list of all its datasets: here one line
    with its own suggestion. A known dataset that is not prepared in data_dir says how to build
    it (its message spans lines; the CLI prints it as one)."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    unknown = smoke_config(str(empty), dataset="imagenet2021", fabricate_data=False)
    line = refused(unknown, tmp_path / "w", preflight.ConfigError,
                   r"config.dataset='imagenet2021' is not a dataset TFDS knows \(did you mean "
                   r"imagenet2012\?\); set --config.dataset", capsys)
    assert "Available datasets" not in line and len(line) < 300
    for name, fix in [("imagenet2012", "tfds build imagenet2012 --manual_dir="),
                      ("mnist", "tfds build mnist --data_dir=")]:
        config = smoke_config(str(empty), dataset=name, fabricate_data=False)
        line = refused(config, tmp_path / "w", pipeline.DatasetNotPreparedError, "is not prepared",
                       capsys)
        assert fix in line and str(empty) in line
    assert not any(empty.rglob("*.tfrecord*"))  # nothing downloaded or built


# --------------------------------------------------------------------------------------------
# 3. unwritable or full workdir, at start-up


def test_workdir_that_cannot_be_created_is_refused(smoke_data_dir, tmp_path, no_trainer, capsys):
    """A workdir below a regular file: mkdir fails whoever runs the test (root included)."""
    (tmp_path / "a_file").write_text("x")
    workdir = tmp_path / "a_file" / "run"
    line = refused(smoke_config(smoke_data_dir), workdir, preflight.ConfigError,
                   "is not writable", capsys)
    assert str(workdir) in line and "pick another --workdir" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_workdir_is_refused(smoke_data_dir, tmp_path, no_trainer, capsys):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    workdir.chmod(0o500)
    try:
        refused(smoke_config(smoke_data_dir), workdir, preflight.ConfigError,
                r"is not writable \(Permission denied\)", capsys)
    finally:
        workdir.chmod(0o700)


def test_full_workdir_is_refused_at_start_up(smoke_data_dir, tmp_path, monkeypatch, capsys):
    """Both ways a disk shows it is full before training: too little room for one checkpoint of
    this run (bwx2: 22.5 M float32 parameters plus two Adam moments, about 258 MiB), refused
    once the state's size is known but before any state is built or step taken; and the probe
    write itself failing with ENOSPC, before anything at all."""
    monkeypatch.setattr(training.Trainer, "init_state", trainer_trap)
    for free_mib in (1, 100):
        monkeypatch.setattr(preflight, "_free_bytes", lambda path, n=free_mib: n << 20)
        line = refused(smoke_config(smoke_data_dir), tmp_path / f"w{free_mib}",
                       preflight.ConfigError,
                       rf"has {free_mib} MiB free but one checkpoint of this run takes 25\d MiB",
                       capsys)
        assert "free some space or pick another --workdir" in line
    monkeypatch.setattr(training, "Trainer", trainer_trap)
    write_bytes = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".write_probe"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    line = refused(smoke_config(smoke_data_dir), tmp_path / "w2", preflight.ConfigError,
                   r"is on a full disk \(No space left on device\)", capsys)
    assert "free some space there or pick another --workdir" in line


# --------------------------------------------------------------------------------------------
# 4. the disk fills up during training


def test_disk_full_at_a_checkpoint_stops_in_one_line_and_keeps_the_last_checkpoint(
        smoke_data_dir, tmp_path, monkeypatch, capsys):
    """The second checkpoint save fails with ENOSPC: the run stops naming the workdir and the
    fix, and step 1's checkpoint stays the newest and restores as the same command would
    (restore_newest_good). Resuming itself is test_reliability's; not rerun here, to save the
    compile of the eval step."""
    workdir = tmp_path / "w"
    real_save = ocp.CheckpointManager.save
    calls = []

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    config = smoke_config(smoke_data_dir, num_train_steps=3, checkpoint_every_steps=1)
    with pytest.raises(run_checkpoints.CheckpointWriteError) as info:
        train_loop.train_and_evaluate(config, workdir)
    assert calls == [1, 2]
    line = one_line(info.value, capsys)
    assert f"checkpoint of step 2 in {workdir / 'checkpoints'} (No space left on device)" in line
    assert f"free some space on the disk of {workdir}" in line
    assert "run the same command to resume" in line
    manager = run_checkpoints.checkpoint_manager(workdir / "checkpoints", config.keep_checkpoints)
    assert manager.latest_step() == 1 and manager.all_steps() == [1]
    trainer = training.Trainer(config, steps_per_epoch=3, mesh=training.make_mesh())
    state, meta = run_checkpoints.restore_newest_good(manager, trainer)
    assert int(state.step) == 1 and meta["arch"] == "resnet18_bwx2"
    params = jax.device_get(state.params)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_save_recognises_the_write_errors_orbax_raises(tmp_path):
    """Orbax writes through tensorstore, which reports a failed write as a ValueError whose text
    carries the errno (seen with a file size limit: "... File too large [os_error_code='27']").
    That becomes CheckpointWriteError too; any other ValueError passes through unchanged."""

    class Manager:
        directory = tmp_path / "checkpoints"

        def __init__(self, error):
            self.error = error

        def latest_step(self):
            return 4

        def save(self, step, args):
            raise self.error

        def wait_until_finished(self):
            pass

    state = SimpleNamespace(step=np.int32(5))
    tensorstore = ValueError('OUT_OF_RANGE: Error writing "step" in OCDBT database: Failed to '
                             "write 3597028 bytes to file 11: No space left on device "
                             "[os_error_code='28']")
    with pytest.raises(run_checkpoints.CheckpointWriteError,
                       match=r"step 5 in .*checkpoints \(No space left on device\).*free some "
                             r"space on the disk of"):
        run_checkpoints.save(Manager(tensorstore), state, {})
    with pytest.raises(run_checkpoints.CheckpointWriteError, match=r"\(Read-only file system\).*make "
                                                              r".* writable again"):
        run_checkpoints.save(Manager(OSError(errno.EROFS, "Read-only file system")), state, {})
    other = ValueError("a bug, not the disk")
    with pytest.raises(ValueError) as info:
        run_checkpoints.save(Manager(other), state, {})
    assert info.value is other


# --------------------------------------------------------------------------------------------
# 5. every expected error class: one line, exit status 2


@pytest.mark.parametrize("error", cli_support.expected_errors(), ids=lambda c: c.__name__)
def test_one_line_errors_prints_each_expected_error_as_one_line(error, capsys):
    """A message spanning lines (the not-prepared hint does) still prints as one `error:` line,
    the last on stderr, so scripts and people find the whole of it there."""
    line = one_line(error("what is wrong\n  tfds build x --data_dir=d\n"), capsys)
    assert line == "error: what is wrong tfds build x --data_dir=d"


def test_one_line_errors_covers_the_classes_train_py_raises_and_nothing_else(capsys):
    """The errors of this module's checks are all among the expected ones (pipeline is imported
    here, as it is in train.py by then); an unexpected error keeps its traceback."""
    expected = cli_support.expected_errors()
    for cls in (preflight.ConfigError, CheckpointError, run_checkpoints.CheckpointWriteError,
                pipeline.DatasetNotPreparedError, FloatingPointError):
        assert issubclass(cls, expected)
    with pytest.raises(RuntimeError, match="a bug"):
        with cli_support.one_line_errors():
            raise RuntimeError("a bug")
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------
# train.py end to end (the only two subprocess tests here)


def run_train(tmp_path, *overrides):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "train.py", "--config", "configs/smoke.py",
                           "--workdir", str(tmp_path / "w"), "--config.progress_bar=False",
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_one_error_line(r):
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def test_train_cli_refuses_a_typo_in_the_eval_split(smoke_data_dir, tmp_path):
    r = run_train(tmp_path, f"--config.data_dir={smoke_data_dir}", "--config.eval_split=validaton")
    line = assert_one_error_line(r)
    assert "config.eval_split='validaton'" in line
    assert line.endswith("--config.eval_split=validation")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_train_cli_refuses_an_unknown_dataset_in_one_line(tmp_path):
    r = run_train(tmp_path, f"--config.data_dir={tmp_path / 'data'}",
                  "--config.dataset=imagenet2021", "--config.fabricate_data=False")
    line = assert_one_error_line(r)
    assert "did you mean imagenet2012?" in line and "Available datasets" not in r.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
