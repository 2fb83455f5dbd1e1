"""The Flax models: structure, parameter counts, PyTorch-semantics layers, gradients, dtypes."""
import functools
import logging
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import print_saved_residuals
import pytest

import ops
from sttn_jax import archs, convolutions, layers, merging, models

PARAM_COUNTS = {"resnet18_bwx2": 22_519_528, "resnet18_ter": 11_530_216, "resnet50": 25_557_032}
STATE_KEYS = {"resnet18_bwx2": 249, "resnet18_ter": 217, "resnet50": 320}  # torch state_dict sizes


@pytest.fixture(scope="module")
def variables32():
    return {arch: models.init_variables(models.create(arch), jax.random.PRNGKey(0))
            for arch in archs.ARCHS}


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_parameter_counts_equal_the_original(arch, variables32):
    v = variables32[arch]
    assert count(v["params"]) == PARAM_COUNTS[arch]
    assert len(jax.tree_util.tree_leaves(v)) == STATE_KEYS[arch]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(v["params"]))


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_output_shapes_at_32_and_224(arch, variables32):
    module = models.create(arch, num_classes=1000)
    v = variables32[arch]  # the same variables serve any input size: pooling is global
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    assert module.apply(v, x).shape == (2, 1000)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 224, 224, 3))
    y = jax.jit(lambda v, x: module.apply(v, x))(v, x)
    assert y.shape == (1, 1000) and bool(jnp.all(jnp.isfinite(y)))


def test_odd_map_problem_names_exactly_the_sides_the_blocks_cannot_add(monkeypatch):
    """With the check off, the model fails to add a stride-2 block's two paths at exactly the
    sides `odd_map_problem` names (45-48 pass: a 1-pixel shortcut broadcasts, as in PyTorch);
    with it on, the error names the cause and sides that fit, for height and width alike. Sides
    32-96 against the model: past 48 the rule repeats every 32 pixels (three halvings)."""
    module = models.create("resnet18_ter", num_classes=10, act_backend="xla")

    def shape_error(h, w):
        try:
            jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False),
                           jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
        except TypeError as e:
            assert "incompatible shapes" in str(e)
            return True
        return False

    with monkeypatch.context() as m:
        m.setattr(archs, "odd_map_problem", lambda side: None)
        failing = [side for side in range(32, 97) if shape_error(side, 32)]
    assert failing == [side for side in range(32, 97) if archs.odd_map_problem(side)]
    assert 80 in failing and not {45, 48, 64, 96} & set(failing)
    assert all(bool(archs.odd_map_problem(s)) == bool(archs.odd_map_problem(s - 32))
               for s in range(81, 513))  # 49-80, checked above, repeats
    v = models.init_variables(module, jax.random.PRNGKey(0))
    for h, w in ((112, 32), (32, 112)):
        with pytest.raises(ValueError, match=f"images of {h}x{w}: a side of 112 reaches a stride-2 "
                           "block as 7 pixels, which its convolution halves to 4 and its max-pool "
                           "shortcut to 3; multiples of 32 fit, e.g. 96 or 128"):
            module.apply(v, jnp.zeros((1, h, w, 3)))


def test_num_classes_and_bad_input_errors():
    module = models.create("resnet18_ter", num_classes=10)
    v = models.init_variables(module, jax.random.PRNGKey(0))
    assert v["params"]["fc"]["kernel"].shape == (512, 10)
    with pytest.raises(ValueError, match="images of 64x16: images must be at least 32x32"):
        module.apply(v, jnp.zeros((1, 64, 16, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        module.apply(v, jnp.zeros((1, 3, 32, 32)))
    # the teacher's shortcuts are strided convolutions, which halve as its main path does: the
    # sides the student refuses (112) add up there; below 32 is refused for every model
    teacher = models.create("resnet50", num_classes=10)
    shapes = jax.eval_shape(lambda x: teacher.init(jax.random.PRNGKey(0), x),
                            jax.ShapeDtypeStruct((1, 112, 80, 3), jnp.float32))
    assert shapes["params"]["fc"]["kernel"].shape == (2048, 10)
    with pytest.raises(ValueError, match="images of 32x31: images must be at least 32x32"):
        jax.eval_shape(lambda x: teacher.init(jax.random.PRNGKey(0), x),
                       jax.ShapeDtypeStruct((1, 32, 31, 3), jnp.float32))
    with pytest.raises(ValueError, match="unknown arch"):
        models.create("resnet18")


def test_block_structure_names_mirror_the_original(variables32):
    p = variables32["resnet18_bwx2"]["params"]
    assert sorted(k for k in p if k.startswith("features")) == sorted(
        ["features_0", "features_1", "features_2"] + [f"features_{i}" for i in range(4, 12)])
    block = p["features_6"]
    assert sorted(block) == ["bn1", "bn2", "bn_add1", "bn_add2", "conv1", "conv2", "prelu1", "prelu2"]
    assert block["conv1"]["kernel_1"].shape == (3, 3, 64, 128)
    assert block["conv1"]["bias_1"].shape == (128,)
    assert variables32["resnet18_ter"]["params"]["features_6"]["conv1"]["kernel"].shape == (3, 3, 64, 128)
    assert "bias" not in p["features_0"]  # stem conv has no bias
    assert len(ops.latent_kernel_paths(p)) == 32  # the 32 block convolutions


def test_initialisation_is_one_program_whatever_the_computation(variables32, x64, caplog):
    """init_variables gives the same float32 values bit for bit with JAX's 64-bit types on
    (float64 runs cast them afterwards) and whatever the module's computation settings, from the
    program variables32 compiled: nothing is compiled again (at most loaded from XLA's persistent
    cache, which tests/conftest.py sets up)."""
    modules = [models.create(archs.TERNARY),
               models.create(archs.TERNARY, dtype=jnp.bfloat16, act_backend="xla",
                             bn_axis_name="batch", remat=True, stem_conv="im2col")]
    for module in modules:
        with caplog.at_level(logging.DEBUG, logger="jax._src.compiler"):
            v = models.init_variables(module, jax.random.PRNGKey(0))
        lines = [r.getMessage() for r in caplog.records if "'jit__lambda'" in r.getMessage()]
        assert all(line.startswith("Persistent compilation cache hit") for line in lines), lines
        want = variables32[archs.TERNARY]
        assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(want)):
            assert a.dtype == b.dtype and a.dtype != jnp.float64
            np.testing.assert_array_equal(a, b)


def test_initialisation_traced_first_inside_eval_shape_keeps_no_tracer(variables32):
    """The first init_variables of a module in a process may come inside a trace (training's
    abstract_train_state, under jax.eval_shape); the traced-once program kept for later calls
    must hold no value of that trace. (The program is in XLA's cache since variables32.)"""
    module = models.create(archs.TERNARY)
    models._init_program.cache_clear()  # as in a new process
    shapes = jax.eval_shape(lambda: models.init_variables(module, jax.random.PRNGKey(0)))
    v = models.init_variables(module, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(v)
    want = variables32[archs.TERNARY]
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    # a module that cannot be a cache key (a list field) is traced for each call instead
    small = models.ResNet50(num_classes=5, stage_sizes=[1, 1, 1, 1])
    shapes = jax.eval_shape(lambda: models.init_variables(small, jax.random.PRNGKey(0)))
    assert shapes["params"]["fc"]["kernel"].shape == (2048, 5)


def test_initialisation_follows_the_original(variables32):
    p = variables32["resnet18_bwx2"]["params"]
    k = np.asarray(p["features_11"]["conv2"]["kernel_1"])
    fan_in = 3 * 3 * 512
    assert k.std() == pytest.approx(1 / fan_in, rel=0.02)  # std = 1/fan_in, not variance
    b = np.asarray(p["features_11"]["conv2"]["bias_1"])
    assert np.abs(b).max() <= 1 / np.sqrt(fan_in) and np.abs(b).max() > 0.5 / np.sqrt(fan_in)
    assert np.asarray(p["features_4"]["prelu1"]["slope"]) == pytest.approx(0.25)
    fc = np.asarray(p["fc"]["kernel"])
    assert fc.std() == pytest.approx(1 / 512, rel=0.05)


def test_batchnorm_matches_torch_train_and_eval(x64):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(4, 5, 6, 3))
    bn = layers.BatchNorm(dtype=jnp.float64)
    v = bn.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
    v = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, v)
    v["params"]["scale"] = jnp.asarray([0.5, 1.5, -2.0])
    v["params"]["bias"] = jnp.asarray([0.1, -0.2, 0.3])
    tbn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor([0.5, 1.5, -2.0], dtype=torch.float64))
        tbn.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    for _ in range(2):  # two training steps: running stats accumulate
        y, upd = bn.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"])
        v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
        yt = tbn.train()(xt).detach().numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(y, yt, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(v["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-12)
    assert int(v["batch_stats"]["num_batches_tracked"]) == int(tbn.num_batches_tracked) == 2
    # explicitly: the running variance takes the unbiased batch variance
    m1 = 0.1 * x.reshape(-1, 3).var(0, ddof=1) + 0.9
    m2 = 0.9 * m1 + 0.1 * x.reshape(-1, 3).var(0, ddof=1)
    np.testing.assert_allclose(v["batch_stats"]["var"], m2, rtol=1e-12)
    y_eval = bn.apply(v, jnp.asarray(x), train=False)
    yt_eval = tbn.eval()(xt).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y_eval, yt_eval, rtol=1e-12, atol=1e-12)


def test_batchnorm_float32_statistics_do_not_cancel_once_the_running_mean_tracks():
    """Training statistics come from one pass, shifted by the running mean: in float32, a batch of
    mean 1000 and std 1 normalises as in float64 once the running mean is near the batch's (with
    a zero shift, the difference of squares cancels: outputs off by ~0.2)."""
    rng = np.random.default_rng(0)
    x = (1000 + rng.normal(0, 1, (64, 8, 8, 4))).astype(np.float32)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5)
    bn = layers.BatchNorm()
    v = bn.init(jax.random.PRNGKey(0), x, train=False)
    v["batch_stats"]["mean"] = jnp.full((4,), 999.7, jnp.float32)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=1e-4)
    n = x.size // 4
    unbiased = x64.var((0, 1, 2)) * n / (n - 1)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), 0.9 + 0.1 * unbiased,
                               rtol=1e-5)


def written_out_batchnorm(x, scale, bias, shift, axis_name, eps=1e-5):
    """Training BatchNorm as plain jnp (autodiff's gradient): shifted moments, pmean if synced."""
    m1, m2 = jnp.mean(x - shift, axis=(0, 1, 2)), jnp.mean(jnp.square(x - shift), axis=(0, 1, 2))
    if axis_name:
        m1, m2 = jax.lax.pmean((m1, m2), axis_name)
    mean, var = m1 + shift, jnp.maximum(m2 - m1 ** 2, 0)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean


@pytest.mark.parametrize("synced", [False, True])
def test_batchnorm_gradient_rule_equals_autodiff(x64, synced):
    """BatchNorm's written-out gradient (one reduction) equals autodiff's of the plain function:
    float64 gradients for x, scale and bias, the loss and the running mean, on 8 devices'
    shards, statistics per device or synchronised."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(2, 3, (16, 5, 5, 6)), rng.normal(size=(16, 5, 5, 6))
    p = {"scale": rng.normal(size=6), "bias": rng.normal(size=6)}
    stats = {"mean": rng.normal(size=6), "var": np.ones(6), "num_batches_tracked": np.int32(0)}
    axis = "d" if synced else None
    bn = layers.BatchNorm(dtype=jnp.float64, axis_name=axis)

    def both(p, x, w):
        def ours(p, x):
            y, upd = bn.apply({"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"])
            return jax.lax.pmean(jnp.sum(y * w * y), "d"), upd["batch_stats"]["mean"]

        def plain(p, x):
            y, mean = written_out_batchnorm(x, p["scale"], p["bias"], stats["mean"], axis)
            return jax.lax.pmean(jnp.sum(y * w * y), "d"), 0.9 * stats["mean"] + 0.1 * mean

        grad = functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)
        return grad(ours)(p, x), grad(plain)(p, x)

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("d",))
    out = ((jax.P(), jax.P() if synced else jax.P("d")), (jax.P(), jax.P("d")))
    got, want = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=(jax.P(), jax.P("d"), jax.P("d")),
                                      out_specs=(out, out)))(p, x, w)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    assert np.abs(np.asarray(got[1][1])).max() > 0.1  # a real gradient for x compared


class ConvBN(nn.Module):
    """A 1x1 convolution and its BatchNorm, written out or folded (the teacher's conv3/bn3)."""
    fold: bool
    dtype: object = jnp.float64
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train):
        conv = layers.Conv(6, 1, use_bias=False, dtype=self.dtype, name="conv")
        bn = layers.BatchNorm(dtype=self.dtype, axis_name=self.axis_name, name="bn")
        return conv(x, batch_norm=functools.partial(bn, train=train)) if self.fold else bn(
            conv(x), train)


def conv_bn_variables(x, dtype=jnp.float64):
    v = ConvBN(False, dtype).init(jax.random.PRNGKey(0), x, train=False)
    v = jax.tree_util.tree_map(lambda a: a.astype(dtype) if a.dtype == jnp.float32 else a, v)
    rng = np.random.default_rng(1)
    v["params"]["bn"] = {"scale": jnp.asarray(rng.normal(1, 0.5, 6), dtype),
                         "bias": jnp.asarray(rng.normal(0, 0.5, 6), dtype)}
    return v


@pytest.mark.parametrize("synced", [False, True])
def test_batchnorm_folded_into_its_convolution_is_the_same_function(x64, synced):
    """The teacher's conv3 + bn3 as one convolution: float64 outputs and running statistics equal
    the written-out pair's, in training (statistics from the input's moments, over 8 devices'
    shards when synchronised) and in evaluation; the parameters are the same tree."""
    x = jnp.asarray(np.random.default_rng(0).normal(0.7, 2.0, (16, 5, 4, 3)))
    v = conv_bn_variables(x)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
        ConvBN(True).init(jax.random.PRNGKey(0), x, train=False))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("d",))
    axis = "d" if synced else None

    def run(fold, train):
        def f(v, x):
            y, upd = ConvBN(fold, axis_name=axis).apply(v, x, train=train, mutable=["batch_stats"])
            return y, jax.tree_util.tree_map(lambda a: jax.lax.pmean(a, "d"), upd)
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(jax.P(), jax.P("d")),
                                     out_specs=(jax.P("d"), jax.P())))(v, x)

    for train in (True, False):
        (y, upd), (want, want_upd) = run(True, train), run(False, train)
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-12, atol=1e-12)
        for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(want_upd)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
        moved = np.abs(np.asarray(upd["batch_stats"]["bn"]["mean"])).max()
        assert (moved > 0.05) == train  # training updated the running mean, evaluation did not


def test_folded_batchnorm_float32_statistics_against_float64():
    """In float32, the folded statistics (second moments about zero, products exact) normalise as
    float64 does for an input whose convolution has |mean| = 10 x std: outputs within 1e-4."""
    rng = np.random.default_rng(0)
    x = (10 + rng.normal(0, 1, (64, 8, 8, 3))).astype(np.float32)
    v = conv_bn_variables(x, jnp.float32)
    v["params"]["conv"]["kernel"] = jnp.full((1, 1, 3, 6), 1 / 3, jnp.float32)
    y = ConvBN(True, jnp.float32).apply(v, x, train=True, mutable=["batch_stats"])[0]
    conv = x.astype(np.float64).mean(-1, keepdims=True) * np.ones(6)
    norm = (conv - conv.mean((0, 1, 2))) / np.sqrt(conv.var((0, 1, 2)) + 1e-5)
    p = v["params"]["bn"]
    want = norm * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=1e-4)


def test_training_folds_only_where_the_statistics_cost_little(x64):
    """The folded statistics' channels x channels x outputs product is paid whatever the batch:
    training folds with at least FOLD_MIN_ROWS rows (pixels on a device) per input channel and
    computes the convolution and its BatchNorm apart below that, the same values either way."""
    for rows in (layers.FOLD_MIN_ROWS * 3, layers.FOLD_MIN_ROWS * 3 - 1):
        x = jnp.asarray(np.random.default_rng(0).normal(0.5, 2.0, (rows, 1, 1, 3)))
        v = conv_bn_variables(x)
        fold = lambda v, x: ConvBN(True).apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
        products = [e for e in jax.make_jaxpr(fold)(v, x).eqns if e.primitive.name == "dot_general"]
        assert bool(products) == (rows >= 3 * layers.FOLD_MIN_ROWS)
        want = ConvBN(False).apply(v, x, train=True, mutable=["batch_stats"])
        for a, b in zip(jax.tree_util.tree_leaves(fold(v, x)), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_only_a_plain_1x1_convolution_folds_its_batchnorm():
    x = jnp.ones((2, 4, 4, 3))
    conv, bn = layers.Conv(4, 3, padding=1, use_bias=False), layers.BatchNorm()
    with pytest.raises(ValueError, match="^only a 1x1 stride-1 convolution"):
        conv.init(jax.random.PRNGKey(0), x, batch_norm=functools.partial(bn, train=True))


class PairBN(nn.Module):
    """A block convolution (binary pair) and its BatchNorm: the bias handed over, or written out."""
    hand_over: bool

    @nn.compact
    def __call__(self, x, train):
        conv = layers.BinaryPairConv(6, dtype=jnp.float64, name="conv")
        bn = layers.BatchNorm(dtype=jnp.float64, name="bn")
        return conv(x, batch_norm=functools.partial(bn, train=train)) if self.hand_over else bn(
            conv(x), train)


def test_binary_pair_hands_its_bias_to_its_batchnorm(x64):
    """BatchNorm(conv + b1 + b2) with the biases as BatchNorm's input shift: float64 outputs and
    running statistics equal the written-out pair's, in training and evaluation. In training the
    biases' gradient is exactly 0 (the written-out pair's is rounding: training's normalisation
    cancels a per-channel shift) and every other gradient equal; in evaluation all equal."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(0.3, 1.5, (8, 5, 5, 4)), rng.normal(size=(8, 5, 5, 6))
    v = PairBN(False).init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
    v = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, v)
    v["params"]["conv"]["bias_1"] = jnp.asarray(rng.normal(0, 2, 6))
    v["params"]["bn"]["scale"] = jnp.asarray(rng.normal(1, 0.5, 6))
    v["batch_stats"]["bn"]["mean"] = jnp.asarray(rng.normal(0, 2, 6))
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
        PairBN(True).init(jax.random.PRNGKey(0), jnp.asarray(x), train=False))

    def run(hand_over, train):
        def loss(params):
            y, upd = PairBN(hand_over).apply({"params": params, "batch_stats": v["batch_stats"]},
                                             x, train=train, mutable=["batch_stats"])
            return jnp.sum(y * w), (y, upd["batch_stats"])
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])

    for train in (True, False):
        ((_, (y, stats)), grads), ((_, (y0, stats0)), grads0) = run(True, train), run(False, train)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=1e-12, atol=1e-12)
        for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(stats0)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
        flat, flat0 = (dict(jax.tree_util.tree_leaves_with_path(g)) for g in (grads, grads0))
        scale = max(float(np.abs(g).max()) for g in flat0.values())
        for key, g0 in flat0.items():
            name = jax.tree_util.keystr(key)
            if train and "bias_" in name:
                assert not np.any(np.asarray(flat[key])), name
                assert float(np.abs(g0).max()) <= 1e-12 * scale, name
            else:
                assert float(np.abs(g0).max()) > 1e-3 * scale, name  # a real gradient compared
                np.testing.assert_allclose(np.asarray(flat[key]), np.asarray(g0), rtol=1e-10,
                                           atol=1e-12 * scale, err_msg=name)
    assert np.array_equal(stats["bn"]["mean"], v["batch_stats"]["bn"]["mean"])  # evaluation
    bn = layers.BatchNorm()
    with pytest.raises(ValueError, match="^a folded 1x1 convolution has no bias"):
        bn.init(jax.random.PRNGKey(0), jnp.ones((2, 4, 4, 3)), train=True,
                conv_kernel=jnp.ones((1, 1, 3, 4)), input_bias=jnp.ones(4))


SHORT_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f64": jnp.float64, "bool": jnp.bool_,
                "i8": jnp.int8}


def saved_bytes(capsys, fn, *args) -> dict[str, int]:
    """{line: bytes} of what `fn`'s backward pass keeps beyond its arguments and literals, from
    `print_saved_residuals` lines such as "bf16[4,8,8,64] named 'conv_out' from ..."."""
    capsys.readouterr()
    print_saved_residuals(fn, *args)
    kept = {}
    for i, line in enumerate(capsys.readouterr().out.splitlines()):
        if "from the argument" in line or "from a " in line:
            continue
        dtype, shape = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
        size = math.prod(int(d) for d in shape.split(",") if d)
        kept[f"{i}: {line}"] = size * jnp.dtype(SHORT_DTYPES[dtype]).itemsize
    return kept


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_remat_keeps_conv_outputs_block_sums_and_statistics_only(dtype, variables32, capsys):
    """remat=True: the training backward pass keeps the stage inputs and the values named in
    SAVED_FOR_BACKWARD, all in the computation dtype (no float32 BatchNorm copies in bfloat16), no
    masks, under a third of what plain autodiff keeps; the rest is recomputed."""
    v = variables32[archs.BWX2]
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 64, 3))

    def loss(params, remat):
        module = models.create(archs.BWX2, dtype=dtype, act_backend="xla", remat=remat)
        logits, _ = module.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                 train=True, mutable=["batch_stats"])
        return jnp.sum(logits.astype(jnp.float32))

    kept = saved_bytes(capsys, functools.partial(loss, remat=True), v["params"])
    plain = saved_bytes(capsys, functools.partial(loss, remat=False), v["params"])
    named = {n for n in models.SAVED_FOR_BACKWARD for k in kept if f"named '{n}'" in k}
    assert named == set(models.SAVED_FOR_BACKWARD)
    width = {jnp.float32: "f32[", jnp.bfloat16: "bf16["}[dtype]
    large = [k.split(": ", 1)[1] for k, b in kept.items() if b > 4 * 512]  # > 1 value per channel
    assert large and all(line.startswith(width) for line in large)
    assert not [line for line in large if "BatchNorm" in line and "named" not in line]
    assert not [line for line in large if "ternary" in line]
    assert sum(kept.values()) < sum(plain.values()) / 3


def test_remat_gives_the_same_gradients_and_statistics(x64):
    """Recomputing instead of storing changes no value: float64 gradients and batch statistics of
    a training step agree with and without remat."""
    v = models.init_variables(models.create(archs.BWX2, 10), jax.random.PRNGKey(0))
    v = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, v)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3), jnp.float64)

    def loss(params, remat):
        module = models.create(archs.BWX2, 10, jnp.float64, "xla", remat=remat)
        logits, updates = module.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                       train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(3 * logits)), updates

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    plain, remat = step(v["params"], False), step(v["params"], True)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-12)
    kernels = [g for g in jax.tree_util.tree_leaves(plain[1]) if g.size > 512]
    assert len(kernels) == 34 and all(np.any(g != 0) for g in kernels)  # a real gradient compared


def test_the_triton_backend_path_runs_under_remat(monkeypatch):
    """backend="triton" puts the kernel call inside custom_vmap inside custom_vjp; under remat that
    structure is recomputed in the backward pass. With an XLA stand-in for the jax-triton call (no
    GPU here), the gradients equal the XLA backend's bit for bit, and so do the outputs of
    inference (under vmap too), which asks only for the kernel without the mask (which kernel the
    compiled training step calls, tests/cuda_lowering.py checks)."""
    from ops import ternary

    asked = []

    def stand_in(flat, with_mask):
        asked.append(with_mask)
        y, keep = ternary._forward_xla(flat)
        return (y, keep) if with_mask else y

    monkeypatch.setattr(ternary, "_triton_call", stand_in)
    monkeypatch.setattr(ternary, "triton_unavailable_reason", lambda: None)
    v = models.init_variables(models.create(archs.BWX2, 10), jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))

    def grads(backend):
        module = models.create(archs.BWX2, 10, act_backend=backend, remat=True)

        def loss(params):
            logits, _ = module.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                     train=True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(3 * logits))
        return jax.tree_util.tree_leaves(jax.jit(jax.grad(loss))(v["params"]))

    for a, b in zip(grads("xla"), grads("triton")):
        np.testing.assert_array_equal(b, a)

    def infer(backend):  # the variables as an argument: as constants, each compile took 6 s
        module = models.create(archs.BWX2, 10, act_backend=backend)
        one = lambda variables, images: module.apply(variables, images, train=False)  # noqa: E731
        return (jax.jit(one)(v, x),
                jax.jit(jax.vmap(one, in_axes=(None, 0)))(v, x.reshape(2, 2, 32, 32, 3)))

    asked.clear()
    for a, b in zip(infer("xla"), infer("triton")):
        np.testing.assert_array_equal(b, a)
    assert asked and not any(asked)  # every activation asked for the kernel without the mask


@pytest.mark.parametrize("form", ["space_to_depth", "im2col"])
@pytest.mark.parametrize("shape", [(32, 34, 7, 3), (33, 35, 7, 3), (15, 17, 4, 1), (9, 9, 5, 0),
                                   (10, 11, 1, 0)])
def test_conv_forms_compute_the_convolution_and_its_gradients(x64, form, shape):
    """`convolutions.CONV_FORMS` (the models' stem_conv): values and both gradients of a stride-2
    convolution in float64, at odd and even sizes and kernels, with and without padding."""
    h, w, k, padding = shape
    rng = np.random.default_rng(k)
    x, kernel = rng.normal(size=(2, h, w, 3)), rng.normal(size=(k, k, 3, 5))
    want, want_vjp = jax.vjp(lambda a, b: convolutions.conv2d(a, b, 2, padding), x, kernel)
    got, got_vjp = jax.vjp(lambda a, b: convolutions.CONV_FORMS[form](a, b, 2, padding), x, kernel)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    g = rng.normal(size=want.shape)
    for a, b in zip(got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_im2col_keeps_no_patches_for_the_backward_pass(capsys):
    """The im2col form rebuilds its patches in the backward pass: what it keeps is the size of its
    input, where the patches are k*k times that."""
    x, kernel = jnp.ones((2, 32, 32, 3)), jnp.ones((7, 7, 3, 64))
    print_saved_residuals(lambda k: jnp.sum(convolutions.CONV_FORMS["im2col"](x, k, 2, 3)), kernel)
    saved = capsys.readouterr().out
    assert "f32[2,16,16,147]" not in saved and "f32[2,32,32,3]" in saved, saved
    print_saved_residuals(lambda k: jnp.sum(convolutions.conv2d_as_dot(x, k, 2, 3)), kernel)
    assert "f32[2,16,16,147]" in capsys.readouterr().out  # what it would keep


def test_stem_conv_reaches_the_stems_and_nothing_else(x64, variables32):
    """models.create(stem_conv=...) computes the 7x7 stem of the student and of the teacher in that
    form, every other convolution as before; the student's training forward pass is unchanged
    (float64)."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.Conv) and context.method_name == "__call__":
            seen.append(("/".join(context.module.scope.path), context.module.form))
        return next_fun(*args, **kwargs)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)))
    with nn.intercept_methods(record):
        for arch in (archs.BWX2, archs.TEACHER):
            module = models.create(arch, 10, jnp.float64, stem_conv="im2col")
            jax.eval_shape(lambda m=module: m.init(jax.random.PRNGKey(0), x, train=False))
    assert ("features_0", "im2col") in seen and ("conv1", "im2col") in seen
    assert all(form == "conv" for path, form in seen if path not in ("features_0", "conv1"))
    assert len({path for path, _ in seen}) == 54  # 1 student stem, 53 teacher convolutions

    v = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a,
                               variables32[archs.BWX2])
    outs = [models.create(archs.BWX2, 1000, jnp.float64, stem_conv=form).apply(
        v, x, train=True, mutable=["batch_stats"]) for form in convolutions.CONV_FORMS]
    for out in outs[1:]:
        for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(outs[0])):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="unknown stem_conv 'fft'; choose one of conv, "):
        models.create(archs.BWX2, stem_conv="fft")


def test_prelu_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 3)).astype(np.float32)
    p = layers.PReLU()
    v = p.init(jax.random.PRNGKey(0), jnp.asarray(x))
    v = {"params": {"slope": jnp.asarray([0.25, -0.5, 2.0])}}
    t = torch.nn.PReLU(3)
    with torch.no_grad():
        t.weight.copy_(torch.tensor([0.25, -0.5, 2.0]))
    want = t(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(p.apply(v, jnp.asarray(x)), want, rtol=1e-6, atol=1e-7)


def distillation_loss(student_logits, teacher_logits):
    return -jnp.mean(jnp.sum(jax.nn.softmax(teacher_logits) * jax.nn.log_softmax(student_logits), -1))


def test_jit_grad_of_distillation_loss(variables32):
    student = models.create("resnet18_bwx2", num_classes=1000)
    v = variables32["resnet18_bwx2"]
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 3))
    teacher = jax.random.normal(jax.random.PRNGKey(3), (4, 1000))

    @jax.jit
    def grad_fn(params, batch_stats):
        def loss(p):
            logits, upd = student.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                        mutable=["batch_stats"])
            return distillation_loss(logits, teacher), upd
        return jax.grad(loss, has_aux=True)(ops.clamp_latent_kernels(params))

    grads, upd = grad_fn(v["params"], v["batch_stats"])
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    g1 = grads["features_8"]["conv1"]["kernel_1"]
    assert float(jnp.abs(g1).max()) > 0
    assert int(upd["batch_stats"]["features_1"]["num_batches_tracked"]) == 1
    # one Adam step changes the latent kernels
    opt = optax.adam(0.005)
    new = optax.apply_updates(v["params"], opt.update(grads, opt.init(v["params"]), v["params"])[0])
    assert not np.array_equal(new["features_8"]["conv1"]["kernel_1"], v["params"]["features_8"]["conv1"]["kernel_1"])


def test_bfloat16_compute_keeps_float32_state(variables32):
    module = models.create("resnet18_bwx2", dtype=jnp.bfloat16)
    v = variables32["resnet18_bwx2"]
    x = jax.random.normal(jax.random.PRNGKey(4), (4, 32, 32, 3))
    logits, upd = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))
    assert all(a.dtype in (jnp.float32, jnp.int32) for a in jax.tree_util.tree_leaves(upd))
    grads = jax.jit(jax.grad(lambda p: jnp.mean(module.apply(
        {"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])[0]
        .astype(jnp.float32) ** 2)))(v["params"])
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    # bf16 logits follow the float32 ones (activations near the thresholds may flip, so loosely)
    ref = module.clone(dtype=jnp.float32).apply(v, x, train=True, mutable=["batch_stats"])[0]
    corr = np.corrcoef(np.asarray(logits, np.float32).ravel(), np.asarray(ref).ravel())[0, 1]
    assert corr > 0.7  # measured 0.90 at random init; a broken bf16 path gives ~0


def test_merged_ternary_model_gives_the_same_logits(variables32):
    bw = models.create("resnet18_bwx2")
    ter = models.create("resnet18_ter")
    v = variables32["resnet18_bwx2"]
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 32, 32, 3))
    # realistic running statistics from two training-mode passes
    for _ in range(2):
        _, upd = bw.apply(v, x, train=True, mutable=["batch_stats"])
        v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    merged = merging.merge_variables(v)
    assert count(merged["params"]) == PARAM_COUNTS["resnet18_ter"]
    # jitted, as merge.py's check and evaluation run them: the bwx2 forward folds each pair with
    # the same jitted fold the merge used, so the kernels and the logits are the same bits (an
    # eager forward folds op by op, in another summation order: ~2e-7 relative, which can move
    # an activation at +-0.5 to the other level)
    a = jax.jit(lambda v, x: bw.apply(v, x))(v, x)
    b = jax.jit(lambda v, x: ter.apply(v, x))(merged, x)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(a, b)
    else:  # another compiler may fuse the fold into the convolution: merge.py's tolerance
        assert float(jnp.abs(a - b).max()) <= merging.MERGE_TOLERANCE * float(jnp.abs(a).max())
    with pytest.raises(ValueError, match="no binary pairs"):
        merging.merge_variables(merged)
