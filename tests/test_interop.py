"""PyTorch checkpoint interop: names, load/save round trips, bad files, the CLI.

Checkpoint files are made the way the original makes them: `torch.save` of
`nn.DataParallel(model).state_dict()` (inside a full training checkpoint with an Adam state, or
{'state_dict'}), or a bare torchvision-style state_dict, from the PyTorch reference models with
every tensor randomised, so a mix-up of two tensors of one shape would show.
"""
import copy
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sttn_jax import interop, model_io  # noqa: E402
from sttn_jax.errors import CheckpointError  # noqa: E402
from sttn_jax.interop import names, reference  # noqa: E402
from tests import reference_training  # noqa: E402
from tests.conftest import assert_one_error_line, run_cli  # noqa: E402

ARCHS = ("resnet18_bwx2", "resnet18_ter", "resnet50")
REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def randomized_model(arch, seed=0):
    """A reference model whose every tensor (parameters, statistics, counts) is random."""
    g = torch.Generator().manual_seed(seed)
    model = reference.build(arch)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(int(torch.randint(1, 10**6, (), generator=g)))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g))
    return model


def write_checkpoint(model, path, layout):
    """layout: 'training' (main.py's full checkpoint), 'state_dict' ({'state_dict'}), both with
    nn.DataParallel keys; 'bare' (a state_dict without prefix, like torchvision's files)."""
    if layout == "bare":
        torch.save(model.state_dict(), path)
        return path
    sd = torch.nn.DataParallel(model).state_dict()
    if layout == "state_dict":
        torch.save({"state_dict": sd}, path)
        return path
    model = copy.deepcopy(model)  # the Adam step below must not change the shared model
    opt = reference_training.make_optimizer(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # an Adam state with tensors in it, as in a real checkpoint
    sd = torch.nn.DataParallel(model).state_dict()
    torch.save({"epoch": 3, "arch": "resnet18_bwx2", "state_dict": sd, "best_prec1": torch.tensor(12.5),
                "optimizer": opt.state_dict()}, path)
    return path


def random_variables(arch, seed=0):
    """Flax variables of `arch` with random values (numpy), made from the abstract variable tree
    (no init run): float32 parameters/statistics, int32 counts."""
    import jax
    import jax.numpy as jnp

    from sttn_jax import models

    module = models.create(arch)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(seed)

    def fill(a):
        if a.dtype == jnp.int32:
            return np.asarray(rng.integers(0, 2**31 - 1), np.int32)
        return rng.standard_normal(a.shape, dtype=np.float32)

    return jax.tree_util.tree_map(fill, abstract)


@pytest.fixture(scope="module")
def models_():
    return {arch: randomized_model(arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def files(models_, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for arch, model in models_.items():
        for layout in ("state_dict", "bare", "training") if arch != "resnet50" else ("bare", "state_dict"):
            out[arch, layout] = write_checkpoint(model, d / f"{arch}_{layout}.pth.tar", layout)
    return out


def saved_state_dict(path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["state_dict"] if "state_dict" in obj else obj


# --------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("arch,n_keys,n_trainable",
                         [("resnet18_bwx2", 249, 22_519_528), ("resnet18_ter", 217, 11_530_216),
                          ("resnet50", 320, 25_557_032)])
def test_names_cover_the_reference_state_dict(arch, n_keys, n_trainable):
    model = reference.build(arch, device="meta")
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mine = {e.torch_key: e.torch_shape for e in names.entries(arch)}
    assert mine == ref
    assert len(mine) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_trainable
    trainable = sum(int(np.prod(e.flax_shape)) for e in names.entries(arch) if e.collection == "params")
    assert trainable == n_trainable


def test_reference_module_order_is_the_originals():
    block = reference.build("resnet18_bwx2", device="meta").features[6]
    assert [n for n, _ in block.named_children()] == [
        "bn1", "ba1", "prelu1", "conv1_1", "conv1_2", "bn_add1", "bn2", "ba2", "prelu2", "conv2_1",
        "conv2_2", "bn_add2", "branch"]
    keys = list(torch.nn.DataParallel(reference.build("resnet18_bwx2", device="meta")).state_dict())
    assert keys[:7] == ["module.features.0.weight", "module.features.1.weight", "module.features.1.bias",
                        "module.features.1.running_mean", "module.features.1.running_var",
                        "module.features.1.num_batches_tracked", "module.features.2.weight"]
    assert keys[7:15] == [f"module.features.4.bn1.{n}" for n in
                          ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")] + [
        "module.features.4.prelu1.weight", "module.features.4.conv1_1.weight",
        "module.features.4.conv1_1.bias"]
    assert keys[-2:] == ["module.fc.weight", "module.fc.bias"]


# --------------------------------------------------------------------------------------------
# loading


def _get(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return tree


# Hand-written correspondences (independent of interop.names): torch key -> (flax path, layout).
SPOT_CHECKS = {
    "resnet18_bwx2": [
        ("features.0.weight", "params/features_0/kernel", "conv"),
        ("features.1.weight", "params/features_1/scale", "same"),
        ("features.1.running_var", "batch_stats/features_1/var", "same"),
        ("features.1.num_batches_tracked", "batch_stats/features_1/num_batches_tracked", "count"),
        ("features.2.weight", "params/features_2/slope", "same"),
        ("features.4.conv1_1.weight", "params/features_4/conv1/kernel_1", "conv"),
        ("features.4.conv1_2.weight", "params/features_4/conv1/kernel_2", "conv"),
        ("features.4.conv1_2.bias", "params/features_4/conv1/bias_2", "same"),
        ("features.6.conv2_1.bias", "params/features_6/conv2/bias_1", "same"),
        ("features.6.bn_add1.running_mean", "batch_stats/features_6/bn_add1/mean", "same"),
        ("features.11.prelu2.weight", "params/features_11/prelu2/slope", "same"),
        ("fc.weight", "params/fc/kernel", "dense"),
        ("fc.bias", "params/fc/bias", "same"),
    ],
    "resnet18_ter": [
        ("features.4.conv1.weight", "params/features_4/conv1/kernel", "conv"),
        ("features.9.conv2.bias", "params/features_9/conv2/bias", "same"),
        ("features.8.bn2.weight", "params/features_8/bn2/scale", "same"),
        ("fc.weight", "params/fc/kernel", "dense"),
    ],
    "resnet50": [
        ("conv1.weight", "params/conv1/kernel", "conv"),
        ("bn1.running_mean", "batch_stats/bn1/mean", "same"),
        ("layer1.0.conv2.weight", "params/layer1_0/conv2/kernel", "conv"),
        ("layer3.0.downsample.0.weight", "params/layer3_0/downsample_0/kernel", "conv"),
        ("layer3.0.downsample.1.bias", "params/layer3_0/downsample_1/bias", "same"),
        ("layer4.2.bn3.num_batches_tracked", "batch_stats/layer4_2/bn3/num_batches_tracked", "count"),
        ("fc.weight", "params/fc/kernel", "dense"),
    ],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_load_puts_each_tensor_in_its_place(arch, models_, files):
    variables = interop.load_torch_checkpoint(files[arch, "state_dict"], arch)
    sd = models_[arch].state_dict()
    for key, path, layout in SPOT_CHECKS[arch]:
        got = _get(variables, path)
        t = sd[key]
        if layout == "conv":
            want = t.permute(2, 3, 1, 0).numpy()
        elif layout == "dense":
            want = t.t().numpy()
        elif layout == "count":
            want = np.asarray(int(t), np.int32)
        else:
            want = t.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
    # The tree is exactly the Flax model's: same paths, shapes, dtypes.
    import jax
    import jax.numpy as jnp

    from sttn_jax import models

    module = models.create(arch)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    assert (jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(abstract))
    for (pa, a), (pb, b) in zip(jax.tree_util.tree_leaves_with_path(variables),
                                jax.tree_util.tree_leaves_with_path(abstract)):
        assert pa == pb and a.shape == b.shape and a.dtype == b.dtype, jax.tree_util.keystr(pa)


def test_resnet50_is_told_apart_from_the_other_torchvision_resnets():
    """Every torchvision ResNet has resnet50's signature key (layer1.0.conv1.weight): only the
    block layout says which one a file holds, so a resnet18 or resnet101 is never taken for the
    teacher."""
    r50 = list(names.by_torch_key("resnet50", 1000))
    assert names.infer_arch(r50) == "resnet50" and names.torchvision_resnet(r50) == "resnet50"
    r101 = r50 + [f"layer3.{b}.conv1.weight" for b in range(6, 23)]
    assert names.torchvision_resnet(r101) == "resnet101" and names.infer_arch(r101) is None
    basic = [k for k in r50 if ".conv3." not in k and ".bn3." not in k]  # resnet34's blocks
    assert names.torchvision_resnet(basic) == "resnet34" and names.infer_arch(basic) is None
    assert names.infer_arch(names.by_torch_key("resnet18_ter", 1000)) == "resnet18_ter"

@pytest.mark.parametrize("arch", ARCHS)
def test_arch_is_inferred_for_every_layout(arch, files):
    layouts = [layout for (a, layout) in files if a == arch]
    loaded = [interop.load_torch_checkpoint(files[arch, layout]) for layout in layouts]
    explicit = interop.load_torch_checkpoint(files[arch, layouts[0]], arch=arch)
    assert model_io.load(files[arch, layouts[0]]).arch == arch
    import jax
    for v in loaded[1:]:
        jax.tree_util.tree_map(np.testing.assert_array_equal, v["batch_stats"], loaded[0]["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[0], explicit)


def test_module_prefix_with_and_without(models_, files, tmp_path):
    model = models_["resnet18_ter"]
    with_prefix = interop.load_torch_checkpoint(files["resnet18_ter", "state_dict"])
    without = interop.load_torch_checkpoint(files["resnet18_ter", "bare"])
    import jax
    jax.tree_util.tree_map(np.testing.assert_array_equal, with_prefix, without)
    _, info = interop.read_state_dict(files["resnet18_ter", "state_dict"])
    assert info["prefixed"]
    mixed = dict(torch.nn.DataParallel(model).state_dict())
    mixed["fc.bias"] = mixed.pop("module.fc.bias")
    torch.save({"state_dict": mixed}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="mixes keys"):
        interop.load_torch_checkpoint(tmp_path / "mixed.pth")


def test_training_checkpoint_with_cuda_free_load(files):
    """main.py's full checkpoint (epoch, arch, optimizer state...) loads its state_dict."""
    v = interop.load_torch_checkpoint(files["resnet18_bwx2", "training"], "resnet18_bwx2")
    assert v["params"]["features_4"]["conv1"]["kernel_1"].shape == (3, 3, 64, 64)


def test_legacy_torch_save_format(models_, tmp_path):
    """Files written by torch < 1.6 (not a zip archive) load too."""
    sd = torch.nn.DataParallel(models_["resnet18_ter"]).state_dict()
    torch.save({"state_dict": sd}, tmp_path / "legacy.pth.tar", _use_new_zipfile_serialization=False)
    v = interop.load_torch_checkpoint(tmp_path / "legacy.pth.tar")
    np.testing.assert_array_equal(v["params"]["fc"]["bias"], sd["module.fc.bias"].numpy())

def test_missing_num_batches_tracked_counts_as_zero(models_, tmp_path):
    sd = {k: v for k, v in models_["resnet50"].state_dict().items() if "num_batches_tracked" not in k}
    torch.save(sd, tmp_path / "old_torchvision.pth")
    v = interop.load_torch_checkpoint(tmp_path / "old_torchvision.pth")
    assert v["batch_stats"]["bn1"]["num_batches_tracked"] == 0
    assert v["batch_stats"]["bn1"]["num_batches_tracked"].dtype == np.int32


def test_other_num_classes(tmp_path):
    model = reference.build("resnet18_ter", num_classes=10)
    torch.save(model.state_dict(), tmp_path / "ten.pth")
    v = interop.load_torch_checkpoint(tmp_path / "ten.pth")
    assert v["params"]["fc"]["kernel"].shape == (512, 10)
    interop.save_torch_checkpoint(v, "resnet18_ter", tmp_path / "back.pth")
    assert saved_state_dict(tmp_path / "back.pth")["module.fc.weight"].shape == (10, 512)


# --------------------------------------------------------------------------------------------
# saving, round trips


@pytest.mark.parametrize("arch,layout", [("resnet18_bwx2", "training"), ("resnet18_bwx2", "bare"),
                                         ("resnet18_ter", "state_dict"), ("resnet50", "bare")])
def test_load_save_reproduces_every_tensor(arch, layout, files, tmp_path):
    src = files[arch, layout]
    out = interop.save_torch_checkpoint(interop.load_torch_checkpoint(src), arch, tmp_path / "out.pth.tar")
    original = torch.load(src, map_location="cpu", weights_only=True)
    original = original["state_dict"] if "state_dict" in original else original
    original = {k.removeprefix("module."): v for k, v in original.items()}
    obj = torch.load(out, map_location="cpu", weights_only=True)
    assert list(obj) == ["state_dict"]
    saved = obj["state_dict"]
    assert all(k.startswith("module.") for k in saved)
    saved = {k.removeprefix("module."): v for k, v in saved.items()}
    assert list(saved) == list(original)  # the original's registration order too
    for k, t in original.items():
        assert saved[k].dtype == t.dtype, k
        assert saved[k].shape == t.shape, k
        assert torch.equal(saved[k], t), k
        if k.endswith("num_batches_tracked"):
            assert saved[k].dtype == torch.int64 and saved[k].ndim == 0
    # The original code loads it unchanged: nn.DataParallel(model).load_state_dict(ckpt['state_dict']).
    target = torch.nn.DataParallel(reference.build(arch))
    target.load_state_dict(obj["state_dict"], strict=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_reproduces_flax_variables(arch, tmp_path):
    import jax

    variables = random_variables(arch, seed=7)
    path = interop.save_torch_checkpoint(variables, arch, tmp_path / "x.pth.tar")
    back = interop.load_torch_checkpoint(path, arch)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(variables)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_gradients_to_torch_state_dict():
    import jax

    variables = random_variables("resnet18_bwx2", 1)
    grads = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) * 2, variables["params"])
    sd = interop.gradients_to_torch_state_dict(grads, "resnet18_bwx2")
    model = reference.build("resnet18_bwx2", device="meta")
    assert list(sd) == [n for n, _ in model.named_parameters()]
    assert sd["features.4.conv1_2.weight"].dtype == torch.float64
    np.testing.assert_array_equal(sd["fc.weight"].numpy(), 2 * np.asarray(variables["params"]["fc"]["kernel"]).T)
    assert list(interop.gradients_to_torch_state_dict({"params": grads}, "resnet18_bwx2")) == list(sd)


def test_save_gradient_tree_without_batch_stats(tmp_path):
    variables = random_variables("resnet18_ter", 1)
    path = interop.save_torch_checkpoint({"params": variables["params"]}, "resnet18_ter", tmp_path / "g.pth")
    sd = saved_state_dict(path)
    names_ = [n for n, _ in reference.build("resnet18_ter", device="meta").named_parameters()]
    assert list(sd) == ["module." + n for n in names_]
    assert not any("running" in k or "num_batches" in k for k in sd)


def test_save_refuses_wrong_variables(tmp_path):
    import jax

    variables = random_variables("resnet18_ter", 1)
    bad = jax.tree_util.tree_map(lambda a: a, variables)
    bad["params"]["fc"]["kernel"] = np.zeros((512, 7), np.float32)
    bad["params"]["fc"]["bias"] = np.zeros((7,), np.float32)
    bad["params"]["features_4"]["conv1"]["kernel"] = np.zeros((3, 3, 64, 65), np.float32)
    with pytest.raises(CheckpointError, match=r"wrong shapes.*features_4/conv1/kernel"):
        interop.save_torch_checkpoint(bad, "resnet18_ter", tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="missing"):
        interop.save_torch_checkpoint(variables, "resnet18_bwx2", tmp_path / "bad.pth")
    assert not (tmp_path / "bad.pth").exists()


# --------------------------------------------------------------------------------------------
# bad files: one CheckpointError naming the file and the problem


def _raises(path, match, arch=None):
    with pytest.raises(CheckpointError) as info:
        interop.load_torch_checkpoint(path, arch)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert info.match(match)
    # no chained exception behind it (raised `from None` where it replaces another)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert isinstance(info.value, ValueError)
    return msg


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    _raises(tmp_path / "random.pth", "not a PyTorch checkpoint")
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1, 2, 3], f)
    _raises(tmp_path / "list.pkl", "not a PyTorch checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    _raises(tmp_path / "list.pth", "not a model checkpoint: it holds a list")
    torch.save({"foo": 1, "bar": "x"}, tmp_path / "dict.pth")
    _raises(tmp_path / "dict.pth", "no 'state_dict'")
    (tmp_path / "empty.pth").write_bytes(b"")
    _raises(tmp_path / "empty.pth", "not a PyTorch checkpoint")
    _raises(tmp_path / "nothing_here.pth", "no such file")
    torch.save({"state_dict": {"a.weight": torch.zeros(2)}}, tmp_path / "unknown.pth")
    _raises(tmp_path / "unknown.pth", "not a checkpoint of resnet18_bwx2 / resnet18_ter / resnet50")


def test_other_arch(files):
    msg = _raises(files["resnet50", "bare"], "holds a resnet50", arch="resnet18_ter")
    assert "not resnet18_ter" in msg
    _raises(files["resnet18_bwx2", "state_dict"], "holds a resnet18_bwx2", arch="resnet18_ter")


def test_missing_unexpected_and_wrong_shapes(models_, tmp_path):
    sd = dict(torch.nn.DataParallel(models_["resnet18_ter"]).state_dict())
    missing = dict(sd)
    del missing["module.features.5.conv2.bias"]
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    _raises(tmp_path / "missing.pth", r"missing keys: features\.5\.conv2\.bias")

    extra = dict(sd)
    extra["module.features.5.conv3.weight"] = torch.zeros(3)
    torch.save({"state_dict": extra}, tmp_path / "extra.pth")
    _raises(tmp_path / "extra.pth", r"unexpected keys: features\.5\.conv3\.weight")

    shapes = dict(sd)
    shapes["module.features.7.conv1.weight"] = torch.zeros(128, 128, 3, 2)
    shapes["module.features.1.running_mean"] = torch.zeros(65)
    torch.save({"state_dict": shapes}, tmp_path / "shapes.pth")
    msg = _raises(tmp_path / "shapes.pth", "wrong shapes")
    assert "features.7.conv1.weight (128, 128, 3, 2) (expected (128, 128, 3, 3))" in msg
    assert "features.1.running_mean (65,)" in msg


def _touch(path):
    Path(path).write_text("the checkpoint ran code")


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_file_that_needs_code_is_refused_never_run(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "payload": RunsCodeWhenUnpickled(marker)},
               path)
    msg = _raises(path, "weights_only")
    assert "run code" in msg and "untrusted" in msg
    assert not marker.exists()
    # The file really is dangerous: a plain unpickling runs its code.
    torch.load(path, weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# package and CLI


def test_import_does_not_import_torch():
    code = "import sys, sttn_jax.interop, sttn_jax.interop.parity, sttn_jax.interop.reference; " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([PYTHON, "-c", code], cwd=REPO, check=True)


def _cli(*args):
    return run_cli("sttn_jax.interop", *args)


def test_cli_convert_and_export_round_trip(files, tmp_path):
    src = files["resnet18_bwx2", "training"]
    r = _cli("convert", src, tmp_path / "model")
    assert r.returncode == 0, r.stderr
    assert model_io.load(tmp_path / "model").arch == "resnet18_bwx2"
    r = _cli("export", tmp_path / "model", tmp_path / "back.pth.tar")
    assert r.returncode == 0, r.stderr
    original = saved_state_dict(src)
    back = saved_state_dict(tmp_path / "back.pth.tar")
    assert list(back) == list(original)
    for k, t in original.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    # --arch is checked
    line = assert_one_error_line(_cli("export", tmp_path / "model", tmp_path / "x.pth",
                                      "--arch", "resnet50"))
    assert "holds a resnet18_bwx2 model, not resnet50" in line and not (tmp_path / "x.pth").exists()


def test_cli_errors_are_one_line(files, tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00junk" * 100)
    line = assert_one_error_line(_cli("convert", tmp_path / "junk.pth", tmp_path / "out"))
    assert "junk.pth" in line
    line = assert_one_error_line(_cli("convert", files["resnet50", "bare"], tmp_path / "out",
                                      "--arch", "resnet18_ter"))
    assert "resnet50" in line and not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    line = assert_one_error_line(_cli("convert", files["resnet18_ter", "state_dict"],
                                      tmp_path / "busy"))
    assert "exists and is not a model checkpoint" in line
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "junk.pth"]  # nothing aside


def test_cli_parity(files, tmp_path):
    src = str(files["resnet18_ter", "state_dict"])
    # A random model with unit-normal BatchNorm statistics: not realistic, but exact in float64.
    r = _cli("parity", "--checkpoint", src, "--batch", 2, "--image_size", 32,
             "--out", tmp_path / "parity.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "float64" in r.stdout and "float32" in r.stdout and "PASS" in r.stdout
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and report["arch"] == "resnet18_ter"
    f64 = next(x for x in report["results"] if x["dtype"] == "float64")
    assert f64["relative_error"] < 1e-8 and f64["top1_agree"] == 2

    from sttn_jax.interop import parity

    images = parity.random_images(2, 32, seed=5)
    variables = interop.load_torch_checkpoint(src)
    logits = parity.torch_logits(variables, "resnet18_ter", images, "float64")
    np.save(tmp_path / "inputs.npy", images)
    np.save(tmp_path / "logits.npy", logits * (1 + 1e-6))  # a wrong reference must fail
    r = _cli("parity", "--checkpoint", src, "--inputs", tmp_path / "inputs.npy",
             "--reference_logits", tmp_path / "logits.npy")
    assert r.returncode == 1 and "FAIL" in r.stdout, r.stderr[-2000:]
    line = assert_one_error_line(_cli("parity", "--checkpoint", src, "--reference_logits", "x.npy"))
    assert "needs --inputs" in line
    line = assert_one_error_line(_cli("parity", "--checkpoint", src, "--image_size", 112))
    assert "--image_size 112: a side of 112 reaches a stride-2 block as 7 pixels" in line, line
