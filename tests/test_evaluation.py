"""eval.py: top-1/top-5/loss of a model from every kind of source, the same as training's own
evaluation; a bwx2 model and its merge give identical results."""
import json

import pytest

from sttn_jax import evaluation, merging
from sttn_jax.errors import ConfigError
from tests.conftest import REPO, assert_one_error_line, run_cli, smoke_config

def assert_quiet(console: str) -> None:
    """Nothing on a normal run's console reads like a failure: no native log lines of TensorFlow,
    oneDNN or XLA, no TFDS warnings about the folders it scans."""
    noisy = [line for line in console.splitlines()
             if line.startswith(("E0000", "W0000", "I0000")) or "oneDNN" in line
             or "Variant folder" in line or "absl::InitializeLog" in line]
    assert not noisy, noisy


RESULT_KEYS = ("top1", "top5", "loss", "num_examples", "arch", "checkpoint")


def test_eval_bwx2_and_merged_give_identical_results(smoke_workdir, merged_smoke, smoke_data_dir, tmp_path):
    config = smoke_config(smoke_data_dir)
    bw = evaluation.evaluate_checkpoint(config, smoke_workdir)
    assert bw["arch"] == "resnet18_bwx2" and bw["num_examples"] == 8
    assert bw["source"]["step"] == 3
    # the same numbers as training's own evaluation of that checkpoint (same devices and data)
    trained = json.loads((smoke_workdir / "final_metrics.json").read_text())["eval"]
    assert (bw["top1"], bw["top5"], bw["num_examples"]) == (trained["top1"], trained["top5"], 8)
    assert bw["loss"] == pytest.approx(trained["loss"], rel=1e-6)

    # eval.py end to end on the merged model, with --out and without --config: the merged model
    # records the config of the run it came from (its fabricated data, 32x32), and eval says so
    result_file = tmp_path / "eval.json"
    r = run_cli("eval.py", "--checkpoint", merged_smoke.out, "--out", result_file,
                "--config.progress_bar=False")
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and "resnet18_ter" in r.stdout
    assert f"config: the training run's, as {merged_smoke.out} records it" in r.stderr
    ter = json.loads(result_file.read_text())
    assert set(RESULT_KEYS) <= set(ter)
    assert ter["arch"] == "resnet18_ter" and ter["checkpoint"] == str(merged_smoke.out)
    assert ter["num_examples"] == bw["num_examples"] == 8
    assert (ter["top1"], ter["top5"]) == (bw["top1"], bw["top5"])
    assert ter["loss"] == pytest.approx(bw["loss"], rel=1e-5)
    assert 0 <= ter["top1"] <= ter["top5"] <= 1
    print(f"\neval bwx2 {bw['top1']:.4f}/{bw['top5']:.4f} loss {bw['loss']:.7f}; "
          f"ternary {ter['top1']:.4f}/{ter['top5']:.4f} loss {ter['loss']:.7f}")


def test_a_merged_model_and_packed_file_record_the_run_they_came_from(smoke_workdir, merged_smoke,
                                                                   tmp_path):
    """What eval.py without --config reads: the workdir's config.json, kept by merge in the model
    checkpoint and in the packed file."""
    from sttn_jax import model_io, packed

    run = json.loads((smoke_workdir / "config.json").read_text())
    assert model_io.load(merged_smoke.out).run_config == run
    variables = model_io.load(merged_smoke.out).variables
    path = packed.write(tmp_path / "m.sttn", variables, meta={"config": run})
    assert model_io.load(path).run_config == run
    assert model_io.load(packed.write(tmp_path / "none.sttn", variables)).run_config is None


def test_eval_without_config_of_a_model_recording_none_names_config(ter_pth, tmp_path):
    """A .pth records no training config: the defaults (ImageNet) are used, and the error when
    that data is missing names --config."""
    r = run_cli("eval.py", "--checkpoint", ter_pth, f"--config.data_dir={tmp_path / 'data'}")
    line = assert_one_error_line(r)
    assert "imagenet2012 is not prepared" in line and "--config FILE" in line
    assert "records no training config" in line


def test_eval_from_pytorch_files(bwx2_pth, smoke_data_dir, tmp_path):
    config = smoke_config(smoke_data_dir)
    ter_out = tmp_path / "ter.pth.tar"
    merging.merge_checkpoint(bwx2_pth, tmp_path / "ter", torch_out=ter_out, image_size=32,
                             batch=4, plot=False, echo=lambda line: None)
    bw = evaluation.evaluate_checkpoint(config, bwx2_pth)
    ter = evaluation.evaluate_checkpoint(config, ter_out, arch="resnet18_ter")
    assert (bw["arch"], ter["arch"]) == ("resnet18_bwx2", "resnet18_ter")
    assert (ter["top1"], ter["top5"], ter["num_examples"]) == (bw["top1"], bw["top5"], bw["num_examples"])
    assert ter["loss"] == pytest.approx(bw["loss"], rel=1e-5)


def test_eval_refuses_bad_batch_and_split(smoke_workdir, smoke_data_dir):
    with pytest.raises(ConfigError, match="not divisible by the 8 devices"):
        evaluation.evaluate_checkpoint(smoke_config(smoke_data_dir, eval_batch_size=12), smoke_workdir)
    with pytest.raises(ConfigError,
                       match=r"eval_split='nope' is not a split of imagenet2012.*'validation'"):
        evaluation.evaluate_checkpoint(smoke_config(smoke_data_dir), smoke_workdir, split="nope")
    with pytest.raises(ConfigError, match=r"'imagenet2021' is not a dataset TFDS knows"
                                                    r" \(did you mean imagenet2012\?\)") as e:
        evaluation.evaluate_checkpoint(smoke_config(smoke_data_dir, dataset="imagenet2021",
                                                    fabricate_data=False), smoke_workdir)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
    with pytest.raises(ConfigError, match="num_classes=1000"):
        evaluation.evaluate_checkpoint(smoke_config(smoke_data_dir, num_classes=10), smoke_workdir)


def test_eval_takes_a_workdir_alone_from_any_directory(smoke_workdir, smoke_data_dir, tmp_path,
                                                      monkeypatch):
    """No --config: the workdir's own config.json (its data, image size, batches); overrides
    still apply. Also: --compilation_cache_dir puts the compiled evaluation step there (without
    JAX_COMPILATION_CACHE_DIR, which these tests otherwise set)."""
    out, cache = tmp_path / "r.json", tmp_path / "xla"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    r = run_cli(str(REPO / "eval.py"), "--checkpoint", smoke_workdir, "--out", out,
                "--config.progress_bar=False", f"--compilation_cache_dir={cache}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"XLA compilation cache: {cache}" in r.stderr
    assert_quiet(r.stderr)
    assert [p for p in cache.iterdir() if p.name.startswith("jit_step_fn-")], sorted(cache.iterdir())
    result = json.loads(out.read_text())
    trained = json.loads((smoke_workdir / "final_metrics.json").read_text())["eval"]
    assert (result["top1"], result["num_examples"], result["image_size"]) == (trained["top1"], 8, 32)

