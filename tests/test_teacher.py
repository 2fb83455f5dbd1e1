"""Training with a teacher, README's main command: train.py with a ResNet-50 `.pth` in torchvision's
layout on 8 (simulated) devices, its first step's loss the distillation loss of the original
(-sum softmax(teacher) * log_softmax(student), batch mean), computed here apart from the train
step: the same initial variables and first batch, the two networks' logits, numpy for the rest.
Also the two switches of that path: the teacher's BatchNorm in eval mode, and BatchNorm
statistics per device rather than over the global batch."""
import json

import jax
import numpy as np
import pytest

import ops
from sttn_jax import model_io, models, training
from sttn_jax.data import pipeline
from tests.conftest import run_cli, seeded_torch, smoke_config

torch = pytest.importorskip("torch")

TEACHER = "resnet50"
# float32 logits from another program (one device here, 8 there: other summation orders), through
# the student's ternary activations: measured 4e-8 and 8e-8 relative. 1e-5 leaves room for other
# processors' rounding and stays far below what a wrong formula, teacher mode or batch statistics
# change (the controls below: 4e-3 and more; the student's logits start near uniform, so the
# teacher moves the first loss little).
RTOL = 1e-5


@pytest.fixture(scope="module")
def teacher_pth(tmp_path_factory):
    """torchvision's resnet50 state_dict layout (torch.save(model.state_dict())), BatchNorm
    statistics away from their init, so that eval mode and train mode differ."""
    from sttn_jax.interop import reference

    g = torch.Generator().manual_seed(5)
    with seeded_torch(5):
        model = reference.build(TEACHER, 1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                m.running_mean.normal_(0.0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    path = tmp_path_factory.mktemp("teacher") / "resnet50-torchvision.pth"
    torch.save(model.state_dict(), path)
    return path


def first_step_inputs(config, devices=None):
    """(mesh, optimizer, initial train state, first global batch, teacher variables) as
    train_and_evaluate has them: the state from config.seed, epoch 0's first batch."""
    mesh = training.make_mesh(devices)
    tx = training.create_optimizer(config, training.learning_rate_fn(config, 3))
    state = training.create_train_state(config, mesh, tx, rng=jax.random.PRNGKey(config.seed))
    batch = next(pipeline.numpy_batches(pipeline.make_train_dataset(config, epoch=0)))
    teacher = model_io.load(config.teacher_checkpoint, arch=TEACHER).variables
    return mesh, tx, state, batch, teacher


def logits(arch, variables, images, train):
    """A network's float32 logits on `images` (train: BatchNorm over `images`, one group)."""
    module = models.create(arch, 1000)
    if train:
        return np.asarray(module.apply(variables, images, train=True, mutable=["batch_stats"])[0])
    return np.asarray(module.apply(variables, images, train=False))


def distillation(student, teacher):
    """The original's TS_Loss, in float64: mean over the batch of -sum softmax(t) log_softmax(s)."""
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    log_softmax = s - s.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    softmax = np.exp(t - t.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    return float(np.mean(-(softmax * log_softmax).sum(-1)))


def student_variables(state):
    return {"params": ops.clamp_latent_kernels(state.params), "batch_stats": state.batch_stats}


@pytest.mark.long
def test_train_py_with_a_torchvision_resnet50_teacher_on_8_devices(
        smoke_data_dir, teacher_pth, tmp_path):
    """The defaults: the teacher's BatchNorm in train mode, as the original runs it, and the
    student's statistics over the global batch of 8 (one example per device)."""
    workdir = tmp_path / "w"
    r = run_cli("train.py", "--config", "configs/smoke.py", "--workdir", workdir,
                f"--config.data_dir={smoke_data_dir}", "--config.progress_bar=False",
                "--config.num_train_steps=1", f"--config.teacher_checkpoint={teacher_pth}",
                timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 8 over 8 devices" in r.stderr
    logged = json.loads((workdir / "final_metrics.json").read_text())
    assert logged["step"] == 1
    config = smoke_config(smoke_data_dir, teacher_checkpoint=str(teacher_pth))
    _, _, state, batch, teacher = first_step_inputs(config)
    images = batch["image"]
    student = logits(config.arch, student_variables(state), images, train=True)
    expected = distillation(student, logits(TEACHER, teacher, images, train=True))
    print(f"first loss {logged['train']['loss']!r}, formula {expected!r}: relative "
          f"{abs(logged['train']['loss'] / expected - 1):.1e}")
    np.testing.assert_allclose(logged["train"]["loss"], expected, rtol=RTOL)
    # controls: what a teacher in eval mode, or labels instead of a teacher, would have logged
    eval_mode = distillation(student, logits(TEACHER, teacher, images, train=False))
    one_hot = np.eye(1000)[batch["label"]] * 1e4
    for wrong in (eval_mode, distillation(student, one_hot)):
        assert abs(wrong - expected) > 10 * RTOL * expected, (wrong, expected)


def test_teacher_in_eval_mode_and_batch_statistics_per_device(smoke_data_dir, teacher_pth):
    """teacher_bn_train_mode=False: the teacher normalises with its running statistics;
    sync_batch_stats=False: each device's student normalises with its own examples' statistics.
    The first step's loss, through train.py's step, on 2 devices of 4 examples (one example per
    device has no statistics at the last 1x1 map, which BatchNorm refuses)."""
    config = smoke_config(smoke_data_dir, teacher_checkpoint=str(teacher_pth),
                          teacher_bn_train_mode=False, sync_batch_stats=False)
    mesh, tx, state, batch, teacher = first_step_inputs(config, jax.devices()[:2])
    images = batch["image"]
    variables = student_variables(state)
    per_device = np.concatenate([logits(config.arch, variables, part, train=True)
                                 for part in np.split(images, mesh.devices.size)])
    t_eval = logits(TEACHER, teacher, images, train=False)
    expected = distillation(per_device, t_eval)
    # controls: the global batch's statistics, or the teacher in train mode
    controls = (distillation(logits(config.arch, variables, images, train=True), t_eval),
                distillation(per_device, logits(TEACHER, teacher, images, train=True)))
    train_step = training.make_train_step(config, mesh, tx, teacher)
    _, metrics = train_step(state, training.shard_batch(  # the state is donated: used up here
        mesh, {k: batch[k] for k in ("image", "label")}))
    loss = float(jax.device_get(metrics["loss"]))
    print(f"first loss {loss!r}, formula {expected!r}: relative {abs(loss / expected - 1):.1e}")
    np.testing.assert_allclose(loss, expected, rtol=RTOL)
    for wrong in controls:
        assert abs(wrong - loss) > 10 * RTOL * loss, (wrong, loss)
