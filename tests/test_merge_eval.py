"""merge.py and eval.py: bwx2 -> ternary merge (logits checked before anything is written), the
merge report, evaluation from every kind of source, and both CLIs end to end.

CPU, 8 simulated devices (conftest), 32x32 images, the fabricated tiny ImageNet; one real
training workdir (3 steps of configs/smoke.py); original-format .pth.tar files made from the
PyTorch reference (`sttn_jax.interop.reference`) as the original's main.py saves them.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402

from sttn_jax import (checkpoints, evaluation, merging, model_sources, preflight,  # noqa: E402
                      report, train_loop)
from sttn_jax.checkpoints import CheckpointError  # noqa: E402
from sttn_jax.interop import parity, reference  # noqa: E402
from sttn_jax.models import RESNET18_BLOCKS  # noqa: E402
from tests.conftest import smoke_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TER_PARAMS = 11_530_216
TER_TERNARY = 10_985_472  # the 16 merged 3x3 kernels
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ON_CPU = jax.default_backend() == "cpu"


def merge_main(argv, monkeypatch):
    """merge.py's main() in this process (its logging set-up would bind pytest's capture)."""
    from sttn_jax import cli_support

    monkeypatch.setattr(cli_support, "setup_logging", lambda *a, **k: None)
    spec = importlib.util.spec_from_file_location("_merge_cli", REPO / "merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def run_cli(script, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))  # XLA_FLAGS (8 devices) comes from conftest
    return subprocess.run([PYTHON, script, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def count(tree):
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def data_dir(smoke_data_dir):
    return smoke_data_dir


@pytest.fixture(scope="module")
def workdir(data_dir, tmp_path_factory):
    """A real training workdir: 3 steps = one epoch, so best/ holds step 3 and checkpoints/ 2, 3."""
    w = tmp_path_factory.mktemp("run") / "workdir"
    result = train_loop.train_and_evaluate(smoke_config(data_dir, num_train_steps=3), w)
    assert result["step"] == 3
    return w


@pytest.fixture(scope="module")
def merged(workdir, tmp_path_factory):
    """merge_checkpoint on the workdir (library entry point of merge.py)."""
    out = tmp_path_factory.mktemp("merged") / "ter"
    return merging.merge_checkpoint(workdir, out, echo=lambda line: None)


ZEROED = 10  # latent weights set exactly to 0 in the .pth: +-alpha levels


def bwx2_reference_model(seed=0):
    """The original's bwx2 as main.py leaves it after some training: Normal(0, 1/fan_in) init,
    BatchNorm affine, statistics and PReLU away from their init, latent weights of every size
    (some beyond the clamp, which the merge must apply), ZEROED of them exactly 0."""
    g = torch.Generator().manual_seed(seed)
    model = reference.init_like_original(reference.build("resnet18_bwx2"), g)
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
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 7, "arch": arch, "state_dict": sd, "best_prec1": 0.0, "optimizer": {}}, path)
    return path


@pytest.fixture(scope="module")
def bwx2_pth(tmp_path_factory):
    return save_original(bwx2_reference_model(), tmp_path_factory.mktemp("pth") / "bwx2.pth.tar",
                         "resnet18_bwx2")


@pytest.fixture(scope="module")
def ter_pth(tmp_path_factory):
    model = reference.init_like_original(reference.build("resnet18_ter"), torch.Generator().manual_seed(1))
    return save_original(model, tmp_path_factory.mktemp("pth") / "ter.pth.tar", "resnet18_ter")


# --------------------------------------------------------------------------------------------
# merge from a training workdir: exact, reported, written


def test_merge_from_workdir_is_exact_and_written(merged, workdir):
    check = merged.check
    assert check.passed and check.relative <= merging.MERGE_TOLERANCE
    assert check.image_size == 32 and check.batch == 8  # the workdir's training image size
    if ON_CPU:  # the merged kernels are bit-identical to the ones the bwx2 forward computes
        assert check.max_abs_diff == 0.0 and check.top1_agree == 8
    print(f"\nworkdir merge check: max|dlogit| {check.max_abs_diff:.3e} relative {check.relative:.3e}")

    meta = checkpoints.read_model_metadata(merged.out)
    assert meta["arch"] == "resnet18_ter"
    assert meta["merged_from"]["kind"] == model_sources.WORKDIR and meta["merged_from"]["step"] == 3
    assert meta["merged_from"]["selected"] == "best" and meta["merge_check"]["passed"]
    variables, arch = checkpoints.load_model_checkpoint(merged.out)
    assert arch == "resnet18_ter" and count(variables["params"]) == TER_PARAMS

    # the saved ternary kernels: per output channel only 0 and +-2 alpha, alpha from the latents
    source = model_sources.load(workdir)
    for path, pair in merging.binary_pairs(source.variables["params"]):
        block, conv = path.split("/")
        t = variables["params"][block][conv]["kernel"]
        w1, w2 = (np.clip(pair[k], -1, 1).astype(np.float64) for k in ("kernel_1", "kernel_2"))
        alpha = (np.abs(w1).sum((0, 1, 2)) + np.abs(w2).sum((0, 1, 2))) / (2 * np.prod(w1.shape[:-1]))
        levels = np.sign(w1) + np.sign(w2)
        np.testing.assert_allclose(t, levels * alpha, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(variables["params"][block][conv]["bias"],
                                      pair["bias_1"] + pair["bias_2"])


def test_merge_report_adds_up(merged):
    rep = json.loads((merged.out / merging.REPORT_JSON).read_text())
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
    # the Larq-style summary agrees with the totals
    rows = rep["summary"]
    assert sum(r["ternary_params"] for r in rows) == p["ternary"]
    assert sum(r["full_precision_params"] for r in rows) == p["full_precision"]
    assert sum(r["memory_bytes"] for r in rows) == rep["size_bytes"]["packed_ternary"]
    assert sum(r["ternary_macs"] for r in rows) == rep["macs"]["ternary"]
    assert rep["size_bytes"]["float32"] == 4 * TER_PARAMS
    png = (merged.out / merging.REPORT_PNG).read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 20_000
    text = report.format_report(rep)
    assert "features.11.conv2" in text and "11,530,216" in text


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


def test_report_at_224_counts_sizes_macs_and_half_levels(bwx2_pth):
    source = model_sources.load(bwx2_pth)
    ter = merging.merge_variables(source.variables)
    rep = report.build_merge_report(source.variables["params"], ter, image_size=224)
    p = rep["parameters"]
    assert (p["ternary"], p["full_precision"], p["total"]) == (TER_TERNARY, TER_PARAMS - TER_TERNARY, TER_PARAMS)
    assert p["alphas"] == 2 * sum(cout for _, cout, _ in RESNET18_BLOCKS)  # 3,840
    assert (rep["macs"]["ternary"], rep["macs"]["full_precision"]) == theoretical_macs(224)
    assert rep["macs"]["ternary"] == 1_676_279_808
    s = rep["size_bytes"]
    assert s["packed_ternary"] == TER_TERNARY // 4 + 4 * p["alphas"] + 4 * p["full_precision"]
    assert 9 < s["compression"] < 10
    # latent weights exactly 0 give the +-alpha levels, and 2 bits no longer suffice
    half = {path: int(np.sum((pair["kernel_1"] == 0) != (pair["kernel_2"] == 0)))
            for path, pair in merging.binary_pairs(source.variables["params"])}
    assert half["features_4/conv1"] >= ZEROED  # (torch's normal_ gives an exact 0 now and then)
    assert rep["overall"]["half_levels"] == sum(half.values())
    for layer in rep["layers"]:
        assert layer["counts"]["-a"] + layer["counts"]["+a"] == half[layer["flax_path"]]
    assert not s["packed_2bit_exact"]


# --------------------------------------------------------------------------------------------
# merge from an original .pth.tar through the CLI, with the original's ternary format


def test_merge_cli_from_original_pth_and_torch_out(bwx2_pth, tmp_path):
    out, tout = tmp_path / "ter", tmp_path / "ter.pth.tar"
    r = run_cli("merge.py", "--checkpoint", bwx2_pth, "--out", out, "--torch-out", tout,
                "--image-size", 32, "--batch", 4)
    assert r.returncode == 0, r.stderr
    assert "merge check" in r.stdout and "PASS" in r.stdout and "relative" in r.stdout
    assert "11,530,216" in r.stdout and "features.11.conv2" in r.stdout
    assert (out / merging.REPORT_JSON).is_file() and (out / merging.REPORT_PNG).is_file()
    meta = checkpoints.read_model_metadata(out)
    assert meta["arch"] == "resnet18_ter" and meta["merged_from"]["kind"] == model_sources.PYTORCH
    assert meta["merged_from"]["epoch"] == 7

    # float32: the JAX bwx2 model and the merged one agree (what the CLI checked)
    source = model_sources.load(bwx2_pth)
    ours, _ = checkpoints.load_model_checkpoint(out)
    check = merging.check_merge(source.variables, ours, batch=4, image_size=32, seed=3)
    assert check.relative <= merging.MERGE_TOLERANCE, check.format()
    print(f"\n.pth merge check: max|dlogit| {check.max_abs_diff:.3e} relative {check.relative:.3e}")

    # --torch-out: the original's format, loaded by the PyTorch reference resnet18_ter
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


def test_merge_refuses_to_write_when_logits_differ(bwx2_pth, tmp_path, monkeypatch, capsys):
    real = merging.merge_variables

    def perturbed(variables):
        out = real(variables)
        k = out["params"]["features_7"]["conv2"]["kernel"]
        out["params"]["features_7"]["conv2"]["kernel"] = k * np.float32(1.05)
        return out

    monkeypatch.setattr(merging, "merge_variables", perturbed)
    out, tout = tmp_path / "ter", tmp_path / "ter.pth.tar"
    with pytest.raises(merging.MergeCheckError, match="refusing to write"):
        merging.merge_checkpoint(bwx2_pth, out, torch_out=tout, image_size=32, batch=4)
    assert "FAIL" in capsys.readouterr().out
    assert not out.exists() and not tout.exists()
    # merge.py (in process, same patched library): exit status 1, the difference printed
    status = merge_main(["--checkpoint", bwx2_pth, "--out", out, "--image-size", 32, "--batch", 4],
                        monkeypatch)
    captured = capsys.readouterr()
    assert status == 1 and "max|dlogit|" in captured.out and "FAIL" in captured.out
    assert len(error_lines(captured.err)) == 1 and "refusing to write" in captured.err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# evaluation


def test_eval_bwx2_and_merged_give_identical_results(workdir, merged, data_dir, tmp_path):
    config = smoke_config(data_dir)
    bw = evaluation.evaluate_checkpoint(config, workdir)
    assert bw["arch"] == "resnet18_bwx2" and bw["num_examples"] == 8
    assert bw["source"]["step"] == 3
    # the same numbers as training's own evaluation of that checkpoint (same devices and data)
    trained = json.loads((workdir / "final_metrics.json").read_text())["eval"]
    assert (bw["top1"], bw["top5"], bw["num_examples"]) == (trained["top1"], trained["top5"], 8)
    assert bw["loss"] == pytest.approx(trained["loss"], rel=1e-6)

    # eval.py end to end on the merged model, with --output
    result_file = tmp_path / "eval.json"
    r = run_cli("eval.py", "--config", "configs/smoke.py", "--checkpoint", merged.out,
                f"--config.data_dir={data_dir}", "--output", result_file)
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and "resnet18_ter" in r.stdout
    ter = json.loads(result_file.read_text())
    assert set(evaluation.RESULT_KEYS) <= set(ter)
    assert ter["arch"] == "resnet18_ter" and ter["checkpoint"] == str(merged.out)
    assert ter["num_examples"] == bw["num_examples"] == 8
    assert (ter["top1"], ter["top5"]) == (bw["top1"], bw["top5"])
    assert ter["loss"] == pytest.approx(bw["loss"], rel=1e-5)
    assert 0 <= ter["top1"] <= ter["top5"] <= 1
    print(f"\neval bwx2 {bw['top1']:.4f}/{bw['top5']:.4f} loss {bw['loss']:.7f}; "
          f"ternary {ter['top1']:.4f}/{ter['top5']:.4f} loss {ter['loss']:.7f}")


def test_eval_from_pytorch_files(bwx2_pth, data_dir, tmp_path):
    config = smoke_config(data_dir)
    ter_out = tmp_path / "ter.pth.tar"
    merging.merge_checkpoint(bwx2_pth, tmp_path / "ter", torch_out=ter_out, image_size=32,
                             batch=4, plot=False, echo=lambda line: None)
    bw = evaluation.evaluate_checkpoint(config, bwx2_pth)
    ter = evaluation.evaluate_checkpoint(config, ter_out, arch="resnet18_ter")
    assert (bw["arch"], ter["arch"]) == ("resnet18_bwx2", "resnet18_ter")
    assert (ter["top1"], ter["top5"], ter["num_examples"]) == (bw["top1"], bw["top5"], bw["num_examples"])
    assert ter["loss"] == pytest.approx(bw["loss"], rel=1e-5)


def test_eval_refuses_bad_batch_and_split(workdir, data_dir):
    with pytest.raises(preflight.ConfigError, match="not divisible by the 8 devices"):
        evaluation.evaluate_checkpoint(smoke_config(data_dir, eval_batch_size=12), workdir)
    with pytest.raises(preflight.ConfigError,
                       match=r"eval_split='nope' is not a split of imagenet2012.*'validation'"):
        evaluation.evaluate_checkpoint(smoke_config(data_dir), workdir, split="nope")
    with pytest.raises(preflight.ConfigError, match=r"'imagenet2021' is not a dataset TFDS knows"
                                                    r" \(did you mean imagenet2012\?\)") as e:
        evaluation.evaluate_checkpoint(smoke_config(data_dir, dataset="imagenet2021",
                                                    fabricate_data=False), workdir)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
    with pytest.raises(preflight.ConfigError, match="num_classes=1000"):
        evaluation.evaluate_checkpoint(smoke_config(data_dir, num_classes=10), workdir)


# --------------------------------------------------------------------------------------------
# sources and errors


def test_workdir_checkpoint_selection(workdir, tmp_path):
    best = model_sources.load(workdir)
    assert (best.arch, best.step, best.selected, best.image_size) == ("resnet18_bwx2", 3, "best", 32)
    two = model_sources.load(workdir, step=2)
    assert two.step == 2 and two.checkpoint_dir.endswith(os.path.join("checkpoints", "2"))
    k2 = two.variables["params"]["features_4"]["conv1"]["kernel_1"]
    k3 = best.variables["params"]["features_4"]["conv1"]["kernel_1"]
    assert not np.array_equal(k2, k3)
    assert model_sources.load(workdir / "checkpoints" / "2").step == 2
    assert model_sources.load(workdir / "checkpoints").selected == "latest"
    # an empty best/: the newest checkpoint
    other = tmp_path / "wd"
    (other / "best").mkdir(parents=True)
    (other / "checkpoints").symlink_to(workdir / "checkpoints")
    latest = model_sources.load(other)
    assert (latest.step, latest.selected) == (3, "latest")
    for a, b in zip(jax.tree_util.tree_leaves(latest.variables), jax.tree_util.tree_leaves(best.variables)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 7 .*checkpoints/: \[2, 3\]"):
        model_sources.load(workdir, step=7)
    with pytest.raises(CheckpointError, match="no such file"):
        model_sources.load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="neither a training workdir"):
        model_sources.load(tmp_path / "plain")
    # merge.py --step N
    res = merging.merge_checkpoint(workdir, tmp_path / "ter2", step=2, plot=False, echo=lambda line: None)
    assert checkpoints.read_model_metadata(res.out)["merged_from"]["step"] == 2
    assert res.check.passed and not (res.out / merging.REPORT_PNG).exists()


def test_wrong_arch_is_one_clear_line(workdir, merged, ter_pth, bwx2_pth, data_dir, tmp_path, capsys,
                                      monkeypatch):
    # eval.py --arch resnet18_ter on a bwx2 workdir (end to end)
    r = run_cli("eval.py", "--config", "configs/smoke.py", "--checkpoint", workdir,
                "--arch", "resnet18_ter", f"--config.data_dir={data_dir}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0]
    assert "resnet18_bwx2" in errors[0] and "resnet18_ter" in errors[0]
    # merge.py on a resnet18_ter .pth (in process: same CLI code)
    with pytest.raises(SystemExit) as exit_info:
        merge_main(["--checkpoint", ter_pth, "--out", tmp_path / "x"], monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "resnet18_ter" in err
    assert "resnet18_bwx2" in err and not (tmp_path / "x").exists()
    # the library says the same for every kind of source
    config = smoke_config(data_dir)
    for source, wanted, held in [(ter_pth, "resnet18_bwx2", "resnet18_ter"),
                                 (bwx2_pth, "resnet18_ter", "resnet18_bwx2"),
                                 (merged.out, "resnet18_bwx2", "resnet18_ter")]:
        with pytest.raises(CheckpointError, match=f"holds a {held} model, not {wanted}"):
            evaluation.evaluate_checkpoint(config, source, arch=wanted)
    # merge.py refuses to overwrite its source or a directory that is not a model checkpoint
    with pytest.raises(CheckpointError, match="overwrite the source"):
        merging.merge_checkpoint(workdir, workdir)
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        merging.merge_checkpoint(workdir, workdir / "best")
