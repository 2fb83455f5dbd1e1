"""train.py's loop: a smoke run on 8 devices, bad input refused before the first step (in one
line that names the fix, nothing written), a diverged step, and the CLI end to end.

Most refusal tests call `train_loop.train_and_evaluate` in process with the state creation and the
step compilation replaced by a trap (`no_training`): a check after them would come after the
compile, so the trap failing the test is the point."""
import datetime
import json

import jax
import numpy as np
import pytest

import ops
from sttn_jax import archs, checkpoints, model_io, models, train_loop, workdir as workdir_lib
from sttn_jax.errors import CheckpointError, ConfigError, DatasetNotPreparedError
from tests.conftest import (assert_one_error_line, latest_checkpoint, one_line, refused,  # noqa: F401
                            run_cli, smoke_config)


def numpy_zero_fraction(*pairs) -> float:
    """The fraction of zeros of the ternary kernels `pairs` fold into, counted in numpy (sign W1
    = -sign W2), apart from the library's count."""
    zeros = sum(np.sum(np.sign(p["kernel_1"]) + np.sign(p["kernel_2"]) == 0) for p in pairs)
    return zeros / sum(p["kernel_1"].size for p in pairs)


def test_smoke_run_on_8_devices(uninterrupted_smoke_run):
    """The smoke config trains, evaluates and checkpoints on 8 devices. (That a resumed run ends
    exactly like this one is test_reliability's kill-and-rerun test.)"""
    assert jax.device_count() == 8
    result, workdir = uninterrupted_smoke_run
    assert result["step"] == 6
    assert result["eval"]["num_examples"] == 8 and 0 <= result["eval"]["top1"] <= 1
    assert np.isfinite(result["train"]["loss"])
    assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 6
    state, meta = latest_checkpoint(workdir)
    # the logged fraction of ternary zeros is the final state's
    fraction = numpy_zero_fraction(*(p for _, p in ops.binary_pairs(state["params"])))
    # (float32 on the devices: within 3e-8, a third of what one kernel entry changes in ~11M)
    assert 0 < fraction < 1
    assert result["train"]["ternary_zero_fraction"] == pytest.approx(fraction, rel=0, abs=3e-8)
    assert int(state["step"]) == 6 and meta["best_top1"] == result["best_top1"]
    # the last two steps and the best evaluated one (evaluations after steps 3 and 6)
    manager = checkpoints.manager(workdir / checkpoints.LATEST, 2, read_only=True)
    best = checkpoints.best_step(manager)
    assert best in (3, 6) and manager.all_steps() == sorted({5, 6, best})
    assert manager.metrics(best)["top1"] == result["best_top1"]
    assert (workdir / "train.log").is_file() and "step 6/6" in (workdir / "train.log").read_text()
    assert not (workdir / workdir_lib.LOCK_FILE).exists()  # a finished run leaves no lock


def test_images_per_sec_times_the_steps_not_their_dispatch(uninterrupted_smoke_run):
    """The smoke run logs every step: the seconds its images/s imply for steps 2..6 add up to the
    time between the log lines of steps 1 and 6 (measured: 27.2 s and 26.6 s). Timed before the
    logged step's metrics were fetched, each interval missed that step's run: 10.0 s of 26.0 s."""
    _, workdir = uninterrupted_smoke_run
    lines = [ln for ln in (workdir / "train.log").read_text().splitlines() if " step " in ln]
    times, implied = [], []
    for k in range(1, 7):
        line = next(ln for ln in lines if f"step {k}/6 " in ln)
        clock = datetime.datetime.strptime(line.split()[1], "%H:%M:%S.%f")
        times.append(clock if not times or clock >= times[-1] else clock + datetime.timedelta(1))
        implied.append(8 / float(line.rsplit("images_per_sec ", 1)[1]))  # global batch 8
    logged = (times[-1] - times[0]).total_seconds()
    assert abs(sum(implied[1:]) - logged) <= 0.1 * logged + 0.1, (implied, logged)


def test_bad_config_values_are_refused_with_the_fix(smoke_data_dir, tmp_path):
    bad = [({"batch_size": 12}, "not divisible by the 8 devices"),
           ({"image_size": 16, "resize_size": 18}, "at least 32"),
           ({"dtype": "float16"}, "choose one of"),
           ({"teacher_checkpoint": str(tmp_path / "missing.pth")}, "does not exist")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            train_loop.train_and_evaluate(smoke_config(smoke_data_dir, **overrides), tmp_path / "w")


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
    files = {"model_dir": model_io.save(d / "bwx2_model", variables, "resnet18_bwx2"),
             "pth": interop.save_torch_checkpoint(variables, "resnet18_bwx2", d / "bwx2.pth.tar")}
    torch.save(torchvision_resnet18_state_dict(), d / "resnet18-f37072fd.pth")
    files["torchvision"] = d / "resnet18-f37072fd.pth"
    return files


@pytest.mark.parametrize("source,found", [("model_dir", "resnet18_bwx2"),
                                          ("pth", "resnet18_bwx2"),
                                          ("torchvision", "resnet18")])
def test_teacher_of_the_wrong_arch_is_refused_before_training(
        source, found, student_files, smoke_data_dir, tmp_path, no_training, capsys):
    """The message names the arch in the file, the arch expected and both fixes. Before, a
    torchvision resnet18 got a list of missing/unexpected resnet50 keys, and the others a fix
    (`--arch`) that train.py has no flag for."""
    path = student_files[source]
    config = smoke_config(smoke_data_dir, teacher_checkpoint=str(path), teacher_arch="resnet50")
    line = refused(config, tmp_path / "w", CheckpointError,
                   f"holds a {found} model but config.teacher_arch='resnet50'", capsys)
    assert str(path) in line and "--config.teacher_checkpoint" in line
    assert "resnet50-0676ba61.pth" in line and "--arch " not in line
    if found in archs.ARCHS:
        assert f"--config.teacher_arch={found}" in line


def test_teacher_with_other_classes_or_an_unknown_arch_is_refused(
        student_files, smoke_data_dir, tmp_path, no_training, capsys):
    """A teacher of the right arch but another class count would fail in the first compiled step
    with a shape error; an arch name that does not exist, at model creation."""
    config = smoke_config(smoke_data_dir, teacher_checkpoint=str(student_files["model_dir"]),
                          teacher_arch="resnet18_bwx2")
    line = refused(config, tmp_path / "w", CheckpointError,
                   "has 10 classes but config.num_classes=1000", capsys)
    assert "--config.num_classes=10" in line
    config = smoke_config(smoke_data_dir, teacher_checkpoint=str(student_files["pth"]),
                          teacher_arch="resnet34")
    refused(config, tmp_path / "w", ConfigError,
            r"config.teacher_arch='resnet34': choose one of .*--config.teacher_arch=resnet50",
            capsys)


@pytest.mark.parametrize("overrides,match,fix", [
    ({"train_split": "trian"}, r"config.train_split='trian' is not a split of imagenet2012",
     "--config.train_split=train"),
    ({"eval_split": "validaton"}, r"config.eval_split='validaton' is not a split of imagenet2012",
     "--config.eval_split=validation"),
])
def test_a_typo_in_a_split_is_refused_before_training(overrides, match, fix, smoke_data_dir,
                                                       tmp_path, no_training, capsys):
    """The eval split used to be opened only at the first evaluation, after an epoch of training;
    and an unknown split was a plain ValueError, a traceback on the command line."""
    line = refused(smoke_config(smoke_data_dir, **overrides), tmp_path / "w",
                   ConfigError, match, capsys)
    assert "['train', 'validation']" in line and line.endswith(fix)


def test_unknown_or_unprepared_dataset_is_refused_before_training(tmp_path, no_training, capsys):
    """A name TFDS does not know gives TFDS's multi-page list of all its datasets: here one line
    with its own suggestion. A known dataset that is not prepared in data_dir says how to build
    it (its message spans lines; the CLI prints it as one)."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    unknown = smoke_config(str(empty), dataset="imagenet2021", fabricate_data=False)
    line = refused(unknown, tmp_path / "w", ConfigError,
                   r"config.dataset='imagenet2021' is not a dataset TFDS knows \(did you mean "
                   r"imagenet2012\?\); set --config.dataset", capsys)
    assert "Available datasets" not in line and len(line) < 300
    for name, fix in [("imagenet2012", "tfds build imagenet2012 --manual_dir="),
                      ("mnist", "tfds build mnist --data_dir=")]:
        config = smoke_config(str(empty), dataset=name, fabricate_data=False)
        line = refused(config, tmp_path / "w", DatasetNotPreparedError, "is not prepared",
                       capsys)
        assert fix in line and str(empty) in line
    assert not any(empty.rglob("*.tfrecord*"))  # nothing downloaded or built


def poison_batch(monkeypatch, index):
    """Makes the `index`-th training batch (0-based, over the run) NaN."""
    orig = train_loop._on_devices
    seen = {"n": 0}

    def poisoned(batches):
        for b in batches:
            if seen["n"] == index:
                b = dict(b, image=np.full_like(b["image"], np.nan))
            seen["n"] += 1
            yield b

    monkeypatch.setattr(train_loop, "_on_devices",
                        lambda mesh, batches, depth=2: orig(mesh, poisoned(batches)))


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(smoke_data_dir, tmp_path, monkeypatch):
    poison_batch(monkeypatch, 1)  # step 2
    cfg = smoke_config(smoke_data_dir, num_train_steps=3, checkpoint_every_steps=1, keep_checkpoints=5)
    with pytest.raises(FloatingPointError, match="at step 2: the run diverged.*last good checkpoint"):
        train_loop.train_and_evaluate(cfg, tmp_path / "stop")
    manager = checkpoints.manager(tmp_path / "stop" / checkpoints.LATEST, 5)
    assert manager.all_steps() == [1]
    # skipping instead, by config
    poison_batch(monkeypatch, 1)
    result = train_loop.train_and_evaluate(
        smoke_config(smoke_data_dir, num_train_steps=3, skip_nonfinite_steps=True), tmp_path / "skip")
    assert result["step"] == 3 and result["skipped_nonfinite_steps"] == 1
    assert np.isfinite(result["train"]["loss"])


def run_train(tmp_path, *overrides):
    return run_cli("train.py", "--config", "configs/smoke.py", "--workdir", tmp_path / "w",
                   "--config.progress_bar=False", *overrides)


def test_train_cli_refuses_unknown_config_keys_and_bad_values(tmp_path):
    line = assert_one_error_line(run_train(tmp_path, "--config.bogus_key=3"))
    assert line.startswith("error: unknown config key 'bogus_key'")
    line = assert_one_error_line(run_train(tmp_path, "--config.batch_sise=3"))
    assert "did you mean --config.batch_size?" in line
    r = run_train(tmp_path, "--config.batch_size=abc")
    assert r.returncode != 0 and "batch_size" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_finished_run_run_again_changes_nothing_and_says_so(smoke_workdir, smoke_data_dir,
                                                              tmp_path):
    """The same command on a finished run: "finished", its final metrics and events as they were,
    and a quiet console (the start of a run reads its data through TensorFlow and TFDS)."""
    import shutil
    from pathlib import Path

    from tests.test_evaluation import assert_quiet

    workdir = tmp_path / "w"
    shutil.copytree(smoke_workdir, workdir)
    before = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    r = run_train(tmp_path, f"--config.data_dir={smoke_data_dir}", "--config.num_train_steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "this run is finished (step 3 of 3" in r.stderr
    after = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    after.pop(Path("train.log"))  # the one line saying so is logged there too
    before.pop(Path("train.log"), None)
    assert after == before
    assert_quiet(r.stderr)


def test_train_cli_refuses_a_typo_in_the_eval_split(smoke_data_dir, tmp_path):
    line = assert_one_error_line(run_train(tmp_path, f"--config.data_dir={smoke_data_dir}",
                                           "--config.eval_split=validaton"))
    assert "config.eval_split='validaton'" in line
    assert line.endswith("--config.eval_split=validation")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_train_cli_refuses_an_unknown_dataset_in_one_line(tmp_path):
    r = run_train(tmp_path, f"--config.data_dir={tmp_path / 'data'}",
                  "--config.dataset=imagenet2021", "--config.fabricate_data=False")
    line = assert_one_error_line(r)
    assert "did you mean imagenet2012?" in line and "Available datasets" not in r.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_tensorboard_holds_the_run(uninterrupted_smoke_run):
    """Read back with TensorBoard's own reader: losses, top-1/top-5, learning rate, images/s,
    sparsity per layer, the evaluation and the hyperparameters."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    _, workdir = uninterrupted_smoke_run
    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    wanted = {"train/loss", "train/top1", "train/top5", "train/learning_rate",
              "train/images_per_sec", "train/ternary_zero_fraction", "eval/top1", "eval/top5",
              "eval/loss", "sparsity/features_4/conv1", "sparsity/features_11/conv2"}
    assert wanted <= tags, wanted - tags
    loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
            for e in events.Tensors("train/loss")]
    assert [step for step, _ in loss] == list(range(1, 7)) and all(np.isfinite(v) for _, v in loss)
    assert [e.step for e in events.Tensors("eval/top1")] == [3, 6]
    # each kernel's fraction of zeros after the last step, as numpy counts it in the checkpoint
    state, _ = latest_checkpoint(workdir)
    for path in ("features_4/conv1", "features_11/conv2"):
        last = events.Tensors(f"sparsity/{path}")[-1]
        block, conv = path.split("/")
        zeros = numpy_zero_fraction(state["params"][block][conv])
        assert last.step == 6 and 0 < zeros < 1
        assert float(tensor_util.make_ndarray(last.tensor_proto)) == pytest.approx(zeros, abs=1e-7)
    info = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    assert hparams["arch"] == "resnet18_bwx2" and hparams["batch_size"] == 8

