"""merge.py: bwx2 -> ternary (logits checked before anything is written), the merge report, and
the CLI end to end. One real training workdir (conftest's smoke_workdir) and original-format
.pth.tar files made from the PyTorch reference as the original's main.py saves them."""
import importlib.util
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ops  # noqa: E402
from sttn_jax import cli, merge_report, merging, model_io, packed  # noqa: E402
from sttn_jax.archs import RESNET18_BLOCKS  # noqa: E402
from sttn_jax.errors import ConfigError, MergeCheckError  # noqa: E402
from sttn_jax.interop import parity, reference  # noqa: E402
from tests.conftest import REPO, ZEROED, assert_one_error_line, run_cli  # noqa: E402

TER_PARAMS = 11_530_216
TER_TERNARY = 10_985_472  # the 16 merged 3x3 kernels
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ON_CPU = jax.default_backend() == "cpu"


def read_metadata(path):
    return json.loads((path / model_io.MODEL_METADATA).read_text())


def count(tree):
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def merge_main():
    """merge.py's main in this process, for tests that patch the library it calls."""
    spec = importlib.util.spec_from_file_location("_merge_cli", REPO / "merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def call(argv):
        module.FLAGS.unparse_flags()
        module.FLAGS(["merge.py", *map(str, argv)])
        try:
            module.main(["merge.py"])
        except SystemExit as e:
            return e.code
        return 0

    return call


def test_merge_from_workdir_is_exact_and_written(merged_smoke, smoke_workdir):
    check = merged_smoke.check
    assert check.passed and check.relative_error <= merging.MERGE_TOLERANCE
    assert check.batch == 8 and check.dtype == "float32"
    if ON_CPU:  # the merged kernels are bit-identical to the ones the bwx2 forward computes
        assert check.max_abs_diff == 0.0 and check.top1_agree == 8
    print(f"\nworkdir merge check: max|dlogit| {check.max_abs_diff:.3e} relative {check.relative_error:.3e}")

    meta = read_metadata(merged_smoke.out)
    assert meta["arch"] == "resnet18_ter"
    assert meta["merged_from"]["kind"] == model_io.WORKDIR and meta["merged_from"]["step"] == 3
    assert meta["merged_from"]["selected"] == "best" and meta["merge_check"]["passed"]
    loaded = model_io.load(merged_smoke.out)
    variables = loaded.variables
    assert loaded.arch == "resnet18_ter" and count(variables["params"]) == TER_PARAMS

    # the saved ternary kernels: per output channel only 0 and +-2 alpha, alpha from the latents
    source = model_io.load(smoke_workdir)
    for path, pair in ops.binary_pairs(source.variables["params"]):
        block, conv = path.split("/")
        t = variables["params"][block][conv]["kernel"]
        w1, w2 = (np.clip(pair[k], -1, 1).astype(np.float64) for k in ("kernel_1", "kernel_2"))
        alpha = (np.abs(w1).sum((0, 1, 2)) + np.abs(w2).sum((0, 1, 2))) / (2 * np.prod(w1.shape[:-1]))
        levels = np.sign(w1) + np.sign(w2)
        np.testing.assert_allclose(t, levels * alpha, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(variables["params"][block][conv]["bias"],
                                      pair["bias_1"] + pair["bias_2"])


def test_merge_report_adds_up(merged_smoke):
    rep = json.loads((merged_smoke.out / merging.REPORT_JSON).read_text())
    p = rep["parameters"]
    assert p["ternary"] + p["full_precision"] == p["total"] == TER_PARAMS
    assert p["ternary"] == TER_TERNARY and sum(p["full_precision_breakdown"].values()) == p["full_precision"]
    assert len(rep["layers"]) == 16
    assert [layer["name"] for layer in rep["layers"][:3]] == [
        "features.4.conv1", "features.4.conv2", "features.5.conv1"]
    assert sum(layer["weights"] for layer in rep["layers"]) == TER_TERNARY
    for layer in rep["layers"]:
        assert sum(layer["counts"].values()) == layer["weights"]
        assert sum(layer["fractions"].values()) == pytest.approx(1.0, abs=1e-12)
        assert 0 < layer["alpha"]["min"] <= layer["alpha"]["mean"] <= layer["alpha"]["max"]
    assert 0 < rep["overall"]["sparsity"] < 1  # STTN's zeros: sign W1 = -sign W2
    assert rep["size_bytes"]["float32"] == 4 * TER_PARAMS
    png = (merged_smoke.out / merging.REPORT_PNG).read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 20_000
    text = merge_report.format_report(rep)
    assert "features.11.conv2" in text and "11,530,216" in text
    table = (merged_smoke.out / merging.LAYER_TABLE).read_text()
    assert "features_11" in table and "fc" in table and "\x1b[" not in table  # no colour codes


def theoretical_macs(size):
    """MACs of resnet18_ter per image, from the architecture (independent of the report code)."""
    conv_out = lambda h, k, s, p: (h + 2 * p - k) // s + 1  # noqa: E731
    h = conv_out(size, 7, 2, 3)
    stem = h * h * 7 * 7 * 3 * 64
    h = conv_out(h, 3, 2, 1)  # max pool
    ternary = 0
    for cin, cout, stride in RESNET18_BLOCKS:
        h = conv_out(h, 3, stride, 1)
        ternary += h * h * 9 * cin * cout + h * h * 9 * cout * cout
    return ternary, stem + 512 * 1000


def test_report_at_224_counts_sizes_macs_and_half_levels(bwx2_pth, tmp_path):
    source = model_io.load(bwx2_pth)
    ter = merging.merge_variables(source.variables)
    rep = merge_report.build_merge_report(source.variables["params"], ter, image_size=224)
    p = rep["parameters"]
    assert (p["ternary"], p["full_precision"], p["total"]) == (TER_TERNARY, TER_PARAMS - TER_TERNARY, TER_PARAMS)
    assert p["alphas"] == 2 * sum(cout for _, cout, _ in RESNET18_BLOCKS)  # 3,840
    assert (rep["macs"]["ternary"], rep["macs"]["full_precision"]) == theoretical_macs(224)
    assert rep["macs"]["ternary"] == 1_676_279_808
    s = rep["size_bytes"]
    stats = p["batchnorm_running_stats"]  # mean and var of the 33 BatchNorms (their counters: int32)
    signs = -(-rep["overall"]["half_levels"] // 8)
    assert s["packed_ternary"] == (TER_TERNARY // 4 + 4 * p["alphas"] + signs
                                   + 4 * (p["full_precision"] + stats) + 4 * 33)
    assert 9 < s["compression"] < 10
    # latent weights exactly 0 give the +-alpha levels, and 2 bits no longer suffice
    half = {path: int(np.sum((pair["kernel_1"] == 0) != (pair["kernel_2"] == 0)))
            for path, pair in ops.binary_pairs(source.variables["params"])}
    assert half["features_4/conv1"] >= ZEROED  # (torch's normal_ gives an exact 0 now and then)
    assert rep["overall"]["half_levels"] == sum(half.values())
    for layer in rep["layers"]:
        assert layer["counts"]["-a"] + layer["counts"]["+a"] == half[layer["flax_path"]]
    # the packed file holds exactly that, and reads back bit for bit
    path = packed.write(tmp_path / "m.sttn", ter)
    assert s["packed_ternary"] <= path.stat().st_size <= 1.01 * s["packed_ternary"]
    back, _, _ = packed.read(path)
    for a, b in zip(jax.tree_util.tree_leaves(ter), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_merge_cli_from_original_pth_and_torch_out(bwx2_pth, tmp_path):
    out, tout = tmp_path / "ter", tmp_path / "ter.pth.tar"
    r = run_cli("merge.py", "--checkpoint", bwx2_pth, "--out", out, "--torch_out", tout,
                "--image_size", 32, "--batch", 4)
    assert r.returncode == 0, r.stderr
    assert "merge check" in r.stdout and "PASS" in r.stdout and "relative" in r.stdout
    assert "11,530,216" in r.stdout and "features.11.conv2" in r.stdout
    assert (out / merging.REPORT_JSON).is_file() and (out / merging.REPORT_PNG).is_file()
    meta = read_metadata(out)
    assert meta["arch"] == "resnet18_ter" and meta["merged_from"]["kind"] == model_io.PYTORCH
    assert meta["merged_from"]["epoch"] == 7

    # float32: the JAX bwx2 model and the merged one agree (what the CLI checked)
    source = model_io.load(bwx2_pth)
    ours = model_io.load(out).variables
    check = merging.check_merge(source.variables, ours, batch=4, image_size=32, seed=3)
    assert check.passed and check.relative_error <= merging.MERGE_TOLERANCE, check.format()
    with pytest.raises(ConfigError, match="image size 112: a side of 112 .* e.g. 96 or 128"):
        merging.check_merge(source.variables, ours, batch=4, image_size=112)
    with pytest.raises(ConfigError, match="needs a batch of at least 1 image, got 0"):
        merging.check_merge(source.variables, ours, batch=0, image_size=32)
    with pytest.raises(ConfigError, match="image size 16: images must be at least 32x32 .* a side "
                       "of 16 is less; multiples of 32 fit"):
        merging.check_merge(source.variables, ours, batch=4, image_size=16)
    print(f"\n.pth merge check: max|dlogit| {check.max_abs_diff:.3e} relative {check.relative_error:.3e}")

    # --torch_out: the original's format, loaded by the PyTorch reference resnet18_ter
    obj = torch.load(tout, map_location="cpu", weights_only=True)
    assert set(obj) == {"state_dict"}
    sd = {k[len("module."):]: v for k, v in obj["state_dict"].items()}
    assert all(k.startswith("module.") for k in obj["state_dict"]) and len(sd) == 217
    ter = reference.build("resnet18_ter")
    ter.load_state_dict(sd)
    images = parity.random_images(2, 32, seed=4)
    with torch.no_grad():
        torch_logits = ter.double().eval()(torch.from_numpy(images).double()).numpy()
    jax_logits = parity.jax_logits(ours, "resnet18_ter", images, "float64")
    err = float(np.max(np.abs(torch_logits - jax_logits)) / np.max(np.abs(torch_logits)))
    assert err < 1e-10, err

    # ... and holds what the original's merge script makes: BinOp-binarize, convK = B1 + B2
    original = reference.build("resnet18_bwx2")
    original.load_state_dict({k[len("module."):]: v for k, v in
                              torch.load(bwx2_pth, weights_only=True)["state_dict"].items()})
    binop = reference.BinOp(original)
    binop.binarization()
    bsd = original.state_dict()
    for key, value in sd.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[2] in ("conv1", "conv2"):
            a, b = (bsd[".".join(parts[:2] + [f"{parts[2]}_{i}", parts[3]])] for i in (1, 2))
            if parts[3] == "bias":
                assert torch.equal(value, a + b), key
            else:  # alpha summed in another order: the last bit may differ
                torch.testing.assert_close(value, a + b, rtol=1e-6, atol=0)
        else:
            assert torch.equal(value, bsd[key]), key


def test_merge_without_torch_refuses_torch_out_before_writing_anything(smoke_workdir, tmp_path):
    """--torch_out where torch cannot be imported (the `make demo` environment): one line, and
    neither the model directory nor the packed file is written."""
    import os
    import subprocess
    import sys

    no_torch = tmp_path / "no_torch"
    (no_torch / "torch").mkdir(parents=True)
    (no_torch / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    outs = tmp_path / "out"
    outs.mkdir()
    r = subprocess.run([sys.executable, str(REPO / "merge.py"), "--checkpoint", smoke_workdir,
                        "--out", outs / "ter", "--packed", outs / "ter.sttn", "--torch_out",
                        outs / "ter.pth.tar"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=f"{no_torch}{os.pathsep}{REPO}"))
    line = assert_one_error_line(r)
    assert "needs torch" in line and "no torch here" in line
    assert list(outs.iterdir()) == []


def test_merge_refuses_clashing_or_unwritable_outputs_before_any_work(smoke_workdir, tmp_path):
    from sttn_jax.errors import CheckpointError

    out = tmp_path / "ter"
    with pytest.raises(CheckpointError, match="name the same file"):
        merging.merge_checkpoint(smoke_workdir, out, packed=tmp_path / "x", torch_out=tmp_path / "x")
    with pytest.raises(CheckpointError, match="lies in the output directory"):
        merging.merge_checkpoint(smoke_workdir, out, packed=out / "m.sttn")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(CheckpointError, match="cannot be written"):
        merging.merge_checkpoint(smoke_workdir, out, packed=tmp_path / "a_file" / "m.sttn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_merge_refuses_to_write_when_logits_differ(bwx2_pth, tmp_path, monkeypatch, capsys,
                                                   merge_main):
    real = merging.merge_variables

    def perturbed(variables):
        out = real(variables)
        k = out["params"]["features_7"]["conv2"]["kernel"]
        out["params"]["features_7"]["conv2"]["kernel"] = k * np.float32(1.05)
        return out

    monkeypatch.setattr(merging, "merge_variables", perturbed)
    out, tout = tmp_path / "ter", tmp_path / "ter.pth.tar"
    with pytest.raises(MergeCheckError, match="refusing to write"):
        merging.merge_checkpoint(bwx2_pth, out, torch_out=tout, image_size=32, batch=4)
    assert "FAIL" in capsys.readouterr().out
    assert not out.exists() and not tout.exists()
    # merge.py (in process, same patched library): exit status 1, the difference printed
    monkeypatch.setattr(cli, "setup_logging", lambda: None)
    status = merge_main(["--checkpoint", bwx2_pth, "--out", out, "--image_size", 32, "--batch", 4])
    captured = capsys.readouterr()
    assert status == 1 and "max|dlogit|" in captured.out and "FAIL" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refusing to write" in errors[0]
    assert not out.exists()
