"""A shortened `make demo`: train a few steps on the embedded digits, merge, evaluate both."""
import json

import pytest

from configs import demo as demo_config
from sttn_jax import demo


@pytest.mark.long
def test_short_demo_end_to_end(tmp_path, capsys):
    c = demo_config.get_config()
    c.data_dir = str(tmp_path / "data")
    c.num_train_steps = 4
    c.batch_size = 32
    c.progress_bar = False
    summary = demo.run(c, tmp_path / "demo")
    on_disk = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert {"bwx2_top1", "ternary_top1"} <= set(on_disk)
    assert on_disk["bwx2_top1"] == on_disk["ternary_top1"] == on_disk["int8_top1"]
    assert on_disk["identical_top1"]
    assert on_disk["size_packed_ternary_bytes"] <= on_disk["packed_file_bytes"] \
        <= 1.01 * on_disk["size_packed_ternary_bytes"]
    assert 0.0 <= on_disk["ternary_top1"] <= 1.0
    assert on_disk["num_test_examples"] == 355 and on_disk["train_steps"] == 4
    assert on_disk["merge_check"]["passed"]
    assert 0.0 < on_disk["sparsity"] < 1.0
    assert on_disk["size_packed_ternary_bytes"] < on_disk["size_float32_bytes"] / 5
    for key in ("merge_report", "merge_plot"):
        assert (tmp_path / "demo" / "ternary" / on_disk[key].rsplit("/", 1)[-1]).is_file()
    out = capsys.readouterr().out
    assert "top-1, merged ternary" in out and "summary.json" in out
