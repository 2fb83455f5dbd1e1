"""benchmarks/run.py in its smoke size, and the numerics of the bfloat16 compute mode on the CPU.

A note on the bf16-vs-fp32 training comparison: STTN's gradient at random initialisation is
chaotic. Ternary activations are steps, and a value moved across a threshold changes the next
layer's input by a whole unit, which moves later thresholds in turn; the straight-through masks
change with them. Feeding the float32 model its input rounded to bfloat16 (the first thing the
bf16 model does) already leaves only ~56 % of the latent-kernel gradient signs unchanged (cosine
~0.2 per layer; a 6e-5 relative input perturbation does about as much). So "the bf16 update has the
fp32 update's sign" is tested against that floor, not against a fixed 90 %.
"""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

import ops
from configs import default
from sttn_jax import merging, models, training

ROOT = Path(__file__).resolve().parent.parent
TIMED_KEYS = ("train_fp32_img_s", "train_bf16_img_s", "eval_fp32_img_s", "eval_bf16_img_s",
              "act_fwd_gbps_fp32", "act_fwd_gbps_bf16", "act_bwd_gbps_fp32", "act_bwd_gbps_bf16",
              "copy_gbps_fp32", "copy_gbps_bf16")
SETTING_KEYS = ("batch", "image_size", "steps", "warmup", "backend", "jax_version", "date")
NUM_CLASSES, SIZE, BATCH = 10, 32, 16


def test_benchmark_smoke_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke",
                           "--compare-backends", "--output", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert result["device"]["kind"] and result["device"]["platform"] == jax.default_backend()
    for key in TIMED_KEYS:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert "train_fp32_peak_gib" in result
    if jax.default_backend() == "cpu":
        assert result["train_fp32_peak_gib"] is None
    for key in SETTING_KEYS:
        assert result[key] is not None, key
    assert (result["batch"], result["image_size"], result["steps"]) == (8, 32, 2)
    assert np.isfinite(result["details"]["train_bf16"]["final_loss"])
    cmp = result["compare_backends"]
    assert cmp["train_fp32_img_s"]["xla"] > 0 and cmp["train_bf16_img_s"]["xla"] > 0
    if cmp["triton_unavailable"]:
        assert cmp["train_fp32_img_s"]["triton"] is None
    # the table
    assert "train step bf16" in proc.stdout and "copy fp32" in proc.stdout and str(out) in proc.stdout


def test_benchmark_imports_no_tensorflow_and_rejects_bad_options():
    code = ("import sys; sys.argv = ['run.py']; import runpy; "
            f"m = runpy.run_path({str(ROOT / 'benchmarks' / 'run.py')!r}, run_name='bench'); "
            "bad = [n for n in sys.modules if n.split('.')[0] in "
            "('tensorflow', 'tensorflow_datasets', 'torch', 'jax_triton')]; "
            "assert not bad, bad; "
            "a = m['parse_args'](['--smoke', '--only', 'copy,act', '--steps', '3']); "
            "assert (a.only, a.steps, a.batch) == (['act', 'copy'], 3, 8), a")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "trian"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--only takes" in proc.stderr


# -- bfloat16 compute mode -------------------------------------------------------------------
@pytest.fixture(scope="module")
def student_variables():
    return jax.device_get(models.init_variables(models.create("resnet18_bwx2", NUM_CLASSES),
                                                jax.random.PRNGKey(0), SIZE))


def make_trainer(dtype, teacher_variables=None):
    c = default.get_config()
    c.num_classes, c.image_size, c.batch_size = NUM_CLASSES, SIZE, BATCH
    c.dtype, c.act_backend = dtype, "xla"
    return training.Trainer(c, steps_per_epoch=10, mesh=training.make_mesh(jax.devices()[:1]),
                            teacher_variables=teacher_variables)


def random_batch(seed=0, n=BATCH):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32),
            "label": (np.arange(n) % NUM_CLASSES).astype(np.int32)}


def latent_sign_agreement(before, a, b):
    """Fraction of latent-kernel entries whose updates a - before and b - before share a sign."""
    same = total = 0
    for path, x0 in jax.tree_util.tree_leaves_with_path(before):
        if path[-1].key in ops.LATENT_KERNEL_NAMES:
            xa, xb = a, b
            for p in path:
                xa, xb = xa[p.key], xb[p.key]
            same += np.sum(np.sign(np.asarray(xa) - x0) == np.sign(np.asarray(xb) - x0))
            total += x0.size
    return same / total


def test_bf16_train_step_keeps_float32_state_and_tracks_float32(student_variables):
    batch = random_batch()
    t32, t16 = make_trainer("float32"), make_trainer("bfloat16")
    s32, m32 = jax.device_get(t32.train_step(t32.state_from_variables(student_variables),
                                             t32.shard_batch(batch), None))
    s16, m16 = jax.device_get(t16.train_step(t16.state_from_variables(student_variables),
                                             t16.shard_batch(batch), None))
    # The noise floor: the float32 step on the input rounded to bfloat16.
    rounded = dict(batch, image=np.asarray(jnp.asarray(batch["image"], jnp.bfloat16), np.float32))
    s32r, m32r = jax.device_get(t32.train_step(t32.state_from_variables(student_variables),
                                               t32.shard_batch(rounded), None))

    # parameters, Adam moments and BatchNorm statistics stay float32 (the same tree and dtypes)
    assert jax.tree_util.tree_structure(s16) == jax.tree_util.tree_structure(s32)
    for a, b in zip(jax.tree_util.tree_leaves(s32), jax.tree_util.tree_leaves(s16)):
        assert a.dtype == b.dtype and b.dtype in (np.float32, np.int32), (a.dtype, b.dtype)
    mu, nu = s16.opt_state[0].mu, s16.opt_state[0].nu
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves((mu, nu)))

    loss32, loss16, loss32r = float(m32["loss"]), float(m16["loss"]), float(m32r["loss"])
    assert np.isfinite(loss16)
    # measured 1.2 % (the fp32 step on the rounded input: 0.9 %)
    assert abs(loss16 - loss32) <= 0.05 * abs(loss32), (loss16, loss32, loss32r)
    assert 0 < float(m16["ternary_zero_fraction"]) < 1

    # Adam's first step is -lr * sign(gradient) per entry: compare signs with the noise floor.
    before = jax.device_get(ops.clamp_latent_kernels(student_variables["params"]))
    agree16 = latent_sign_agreement(before, s32.params, s16.params)
    floor = latent_sign_agreement(before, s32.params, s32r.params)
    # measured 0.569 vs a floor of 0.564; an unrelated (broken) gradient gives 0.500 +- 0.0002
    assert agree16 >= floor - 0.02 and agree16 > 0.53, (agree16, floor)

    # The stem's BatchNorm sees no ternary activation before it: its statistics follow float32.
    for key in ("mean", "var"):
        np.testing.assert_allclose(s16.batch_stats["features_1"][key],
                                   s32.batch_stats["features_1"][key], rtol=0.02, atol=1e-3)


def test_bf16_eval_agrees_with_float32_in_top1(student_variables):
    # A resnet18_ter (the student merged) whose BatchNorm statistics come from train-mode passes.
    variables = merging.merge_variables(student_variables)
    module32 = models.create("resnet18_ter", NUM_CLASSES, jnp.float32, "xla")
    update = jax.jit(lambda v, x: module32.apply(v, x, train=True, mutable=["batch_stats"])[1])
    calibration = jnp.asarray(random_batch(1, 32)["image"])
    for _ in range(30):  # momentum 0.1: the running statistics are 96 % the batch's afterwards
        variables = {"params": variables["params"], **update(variables, calibration)}
    images = jnp.asarray(random_batch(2, 64)["image"])
    module16 = models.create("resnet18_ter", NUM_CLASSES, jnp.bfloat16, "xla")
    apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))  # noqa: E731
    logits32 = np.asarray(apply(module32)(variables, images))
    logits16 = apply(module16)(variables, images)
    assert logits16.dtype == jnp.bfloat16
    logits16 = np.asarray(logits16, np.float32)
    assert np.all(np.isfinite(logits16))
    agree = np.mean(logits32.argmax(-1) == logits16.argmax(-1))
    corr = np.corrcoef(logits32.ravel(), logits16.ravel())[0, 1]
    assert agree >= 0.9 and corr > 0.95, (agree, corr)  # measured 1.0 and 0.997


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    yield from _all_eqns(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    yield from _all_eqns(sub)


def test_bf16_train_step_runs_every_convolution_and_matmul_in_bf16():
    """No float32 leak into the heavy ops of the bf16 step (student and teacher, forward and
    backward), which would cost the GPU its bf16 speed. Traced only, nothing compiled."""
    shapes = jax.eval_shape(lambda: models.create("resnet50", NUM_CLASSES).init(
        jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))
    teacher = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    trainer = make_trainer("bfloat16", teacher)
    batch = {"image": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
    jaxpr = jax.make_jaxpr(trainer.train_step)(trainer.abstract_state(), batch,
                                               trainer.teacher_variables)
    heavy = [e for e in _all_eqns(jaxpr.jaxpr)
             if e.primitive.name in ("conv_general_dilated", "dot_general")]
    # the 17 student convolutions forward and backward, the 53 of the teacher forward, 2 classifiers
    assert len(heavy) > 100
    leaks = [(e.primitive.name, [str(v.aval.dtype) for v in e.invars]) for e in heavy
             if any(v.aval.dtype != jnp.bfloat16 for v in e.invars)]
    assert not leaks, leaks[:5]
