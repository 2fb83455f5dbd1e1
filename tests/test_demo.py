"""`make demo` shortened to two epochs: it learns the embedded digits, through train.py's code path
(training pipeline, steps, evaluation), the merge and the evaluations of all three models."""
import json

import pytest

from tests.conftest import run_cli

STEPS, BATCH = 90, 32  # two epochs of 1442 // 32 batches
# Chance is 10 %. A training pipeline that gives two classes each other's labels scores at most
# 79 % (the 73 of 355 test digits of those two classes wrong): the bound sits above that, and
# below what two epochs reach (96.1 % measured; 82 % after the first).
LEARNED_TOP1 = 0.85


@pytest.mark.long
def test_the_demo_learns_the_digits_end_to_end(tmp_path, monkeypatch):
    """`python -m sttn_jax.demo` on one CPU device, as it runs on a user's machine (the 8
    simulated devices of the other tests would only add cost here)."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    workdir = tmp_path / "demo"
    r = run_cli("sttn_jax.demo", "--workdir", workdir, f"--config.data_dir={tmp_path / 'data'}",
                f"--config.num_train_steps={STEPS}", f"--config.batch_size={BATCH}",
                "--config.progress_bar=False", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["train_steps"] == STEPS and summary["num_test_examples"] == 355
    assert summary["bwx2_top1"] >= LEARNED_TOP1, summary
    assert summary["bwx2_top1"] == summary["ternary_top1"] == summary["int8_top1"]
    assert summary["identical_top1"]
    train = json.loads((workdir / "train" / "final_metrics.json").read_text())
    assert train["eval"]["top1"] == summary["bwx2_top1"]  # the training loop's own evaluation
    assert summary["merge_check"]["passed"]
    assert 0.0 < summary["sparsity"] < 1.0
    assert summary["size_packed_ternary_bytes"] <= summary["packed_file_bytes"] \
        <= 1.01 * summary["size_packed_ternary_bytes"]
    assert summary["size_packed_ternary_bytes"] < summary["size_float32_bytes"] / 5
    for key in ("merge_report", "merge_plot"):
        assert (workdir / "ternary" / summary[key].rsplit("/", 1)[-1]).is_file()
    assert "top-1, merged ternary" in r.stdout and "summary.json" in r.stdout
