"""model_io: one loader for every source (training workdirs, model checkpoints, original .pth
files), checkpoint selection in a workdir, and one clear error per mistake."""
import json
import shutil

import jax
import numpy as np
import pytest

from sttn_jax import evaluation, merging, model_io
from sttn_jax.errors import CheckpointError
from tests.conftest import assert_one_error_line, run_cli, smoke_config


def read_metadata(path):
    return json.loads((path / model_io.MODEL_METADATA).read_text())


def test_workdir_checkpoint_selection(smoke_workdir, tmp_path):
    best = model_io.load(smoke_workdir)
    assert (best.arch, best.step, best.selected, best.image_size) == ("resnet18_bwx2", 3, "best", 32)
    two = model_io.load(smoke_workdir, step=2)
    assert two.step == 2 and two.selected == "step"
    k2 = two.variables["params"]["features_4"]["conv1"]["kernel_1"]
    k3 = best.variables["params"]["features_4"]["conv1"]["kernel_1"]
    assert not np.array_equal(k2, k3)
    assert model_io.load(smoke_workdir / "checkpoints" / "2").step == 2
    assert model_io.load(smoke_workdir / "checkpoints").selected == "latest"
    assert model_io.load(smoke_workdir / "checkpoints").step == 3
    latest = model_io.load(smoke_workdir / "checkpoints")
    for a, b in zip(jax.tree_util.tree_leaves(latest.variables), jax.tree_util.tree_leaves(best.variables)):
        np.testing.assert_array_equal(a, b)
    # a workdir whose steps were never evaluated: the newest
    other = tmp_path / "wd" / "checkpoints"
    other.mkdir(parents=True)
    shutil.copytree(smoke_workdir / "checkpoints" / "2", other / "2")
    shutil.rmtree(other / "2" / "metrics", ignore_errors=True)
    assert (model_io.load(other.parent).step, model_io.load(other.parent).selected) == (2, "latest")
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 7 \(checkpoints/: \[2, 3\]\)"):
        model_io.load(smoke_workdir, step=7)
    with pytest.raises(CheckpointError, match="no such file"):
        model_io.load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="neither a training workdir"):
        model_io.load(tmp_path / "plain")
    # merge.py --step N
    res = merging.merge_checkpoint(smoke_workdir, tmp_path / "ter2", step=2, plot=False, echo=lambda line: None)
    assert read_metadata(res.out)["merged_from"]["step"] == 2
    assert res.check.passed and not (res.out / merging.REPORT_PNG).exists()


def test_wrong_arch_is_one_clear_line(smoke_workdir, merged_smoke, ter_pth, bwx2_pth, smoke_data_dir,
                                      tmp_path):
    # eval.py --arch resnet18_ter on a bwx2 workdir, merge.py on a resnet18_ter .pth (end to end)
    r = run_cli("eval.py", "--config", "configs/smoke.py", "--checkpoint", smoke_workdir,
                "--arch", "resnet18_ter", f"--config.data_dir={smoke_data_dir}")
    line = assert_one_error_line(r)
    assert "holds a resnet18_bwx2 model, not resnet18_ter" in line and "merge it first" in line
    r = run_cli("merge.py", "--checkpoint", ter_pth, "--out", tmp_path / "x")
    line = assert_one_error_line(r)
    assert "resnet18_ter" in line and "resnet18_bwx2" in line and not (tmp_path / "x").exists()
    # the library says the same for every kind of source
    config = smoke_config(smoke_data_dir)
    for source, wanted, held in [(ter_pth, "resnet18_bwx2", "resnet18_ter"),
                                 (bwx2_pth, "resnet18_ter", "resnet18_bwx2"),
                                 (merged_smoke.out, "resnet18_bwx2", "resnet18_ter")]:
        with pytest.raises(CheckpointError, match=f"holds a {held} model, not {wanted}"):
            evaluation.evaluate_checkpoint(config, source, arch=wanted)
    # merge.py refuses to overwrite its source or a directory that is not a model checkpoint
    with pytest.raises(CheckpointError, match="overwrite the source"):
        merging.merge_checkpoint(smoke_workdir, smoke_workdir)
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        merging.merge_checkpoint(smoke_workdir, smoke_workdir / "checkpoints")

