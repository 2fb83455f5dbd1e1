"""benchmarks/run.py in its smoke size: every key written, bad options refused; and
benchmarks/gpu_plan.py, which compiles for an H100 without one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMED_KEYS = ("train_fp32_img_s", "train_bf16_img_s", "eval_fp32_img_s", "eval_bf16_img_s",
              "eval_int8_img_s", "eval_int8_bf16_img_s",
              "act_fwd_gbps_fp32", "act_fwd_gbps_bf16", "act_bwd_gbps_fp32", "act_bwd_gbps_bf16",
              "act_infer_gbps_fp32", "act_infer_gbps_bf16",
              "copy_gbps_fp32", "copy_gbps_bf16")
SETTING_KEYS = ("batch", "image_size", "steps", "warmup", "backend", "jax_version", "date")


@pytest.mark.long
def test_benchmark_smoke_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke",
                           "--compare-backends", "--compare-teacher-bn", "--output", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert result["device"]["kind"] and result["device"]["platform"] == jax.default_backend()
    for key in TIMED_KEYS:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert "train_fp32_peak_gib" in result and "train_bf16_peak_gib" in result
    if jax.default_backend() == "cpu":
        assert result["train_fp32_peak_gib"] is None
    for key in SETTING_KEYS:
        assert result[key] is not None, key
    assert (result["batch"], result["image_size"], result["steps"]) == (8, 32, 2)
    assert np.isfinite(result["details"]["train_bf16"]["final_loss"])
    cmp = result["compare_backends"]
    for key in ("train_fp32_img_s", "train_bf16_img_s", "eval_fp32_img_s", "eval_bf16_img_s"):
        assert cmp[key]["xla"] > 0, key
        if cmp["triton_unavailable"]:
            assert cmp[key]["triton"] is None, key
    for way in ("fwd", "bwd", "infer"):
        assert result["details"][f"act_{way}_fp32"]["backend"] == (
            "xla" if cmp["triton_unavailable"] else "triton")
    # inference's activation reads x and writes y, as the copy does: no mask
    assert result["details"]["act_infer_bf16"]["bytes"] == result["details"]["copy_bf16"]["bytes"]
    # the table
    assert "train step bf16" in proc.stdout and "copy fp32" in proc.stdout and str(out) in proc.stdout
    assert "eval bf16 triton/xla" in proc.stdout
    # the teacher's BatchNorm on its running statistics, beside the default's main run
    row = result["compare_teacher_bn"]["train_bf16_img_s"]
    assert row["train"] == result["train_bf16_img_s"] and row["eval"] > 0
    assert result["details"]["train_bf16_teacher_bn_eval"]["teacher_bn_train_mode"] is False
    assert result["details"]["train_bf16"]["teacher_bn_train_mode"] is True
    for label in ("train_bf16_img_s by teacher BN mode", "eval_bf16_img_s by inference dtype"):
        assert f"wins {label}: " in proc.stdout, label
    # a comparison with one setting timed (no Triton here) has no winner
    assert ("wins train_fp32_img_s by backend: " in proc.stdout) == (not cmp["triton_unavailable"])


def test_benchmark_names_the_fastest_setting_of_each_comparison():
    """winners(): one line per comparison that timed the default and another setting, naming the
    fastest and its gain over the default; untimed settings (None) are left out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = {"backend_resolved": {"fp32": "xla", "bf16": "xla"}, "stem_conv": "conv",
              "compare_backends": {"train_bf16_img_s": {"triton": 110.0, "xla": 100.0},
                                   "train_fp32_img_s": {"triton": None, "xla": 50.0},
                                   "triton_unavailable": None},
              "compare_stems": {"train_bf16_img_s": {"conv": 100.0, "im2col": 90.0}},
              "compare_teacher_bn": {"train_bf16_img_s": {"train": 100.0, "eval": 125.0}},
              "eval_fp32_img_s": 40.0, "eval_int8_img_s": 30.0,
              "eval_bf16_img_s": None, "eval_int8_bf16_img_s": 60.0}
    assert bench.winners(result) == [
        "wins train_bf16_img_s by backend: triton (+10.0% over xla)",
        "wins train_bf16_img_s by stem: conv",
        "wins train_bf16_img_s by teacher BN mode: eval (+25.0% over train)",
        "wins eval_fp32_img_s by inference dtype: fp32"]


def test_benchmark_times_inference_with_every_stem_form(tmp_path):
    """--stem-conv sets the main runs' form; --compare-stems adds the others (inference only
    here: the training step's forms are compiled by the GPU plan test, and cost a minute)."""
    out = tmp_path / "stems.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke",
                           "--only", "eval", "--stem-conv", "im2col", "--compare-stems",
                           "--output", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {} and result["train_bf16_img_s"] is None
    row = result["compare_stems"]["eval_bf16_img_s"]
    assert list(row) == ["im2col", "conv", "space_to_depth"]
    assert row["im2col"] == result["eval_bf16_img_s"] and all(v > 0 for v in row.values())
    assert result["details"]["eval_int8_bf16"]["stem_conv"] == "im2col"
    assert result["details"]["eval_bf16_stem_conv"]["stem_conv"] == "conv"
    assert list(result["compare_stems"]) == ["eval_bf16_img_s"]
    assert "eval bf16 by stem" in proc.stdout


def test_benchmark_imports_no_tensorflow_and_rejects_bad_options():
    code = ("import sys; sys.argv = ['run.py']; import runpy; "
            f"m = runpy.run_path({str(ROOT / 'benchmarks' / 'run.py')!r}, run_name='bench'); "
            "bad = [n for n in sys.modules if n.split('.')[0] in "
            "('tensorflow', 'tensorflow_datasets', 'torch', 'jax_triton')]; "
            "assert not bad, bad; "
            "a = m['parse_args'](['--smoke', '--only', 'copy,act', '--steps', '3']); "
            "assert (a.only, a.steps, a.batch) == (['act', 'copy'], 3, 8), a\n"
            "for side in (16, 112):\n"
            "    try:\n"
            "        m['parse_args'](['--image-size', str(side)])\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 2\n"
            "    else:\n"
            "        raise AssertionError(side)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refusals = [ln for ln in proc.stderr.splitlines() if "error: --image-size" in ln]
    assert len(refusals) == 2, proc.stderr[-3000:]
    assert "--image-size 16: images must be at least 32x32" in refusals[0]
    assert "--image-size 112: a side of 112 reaches a stride-2 block" in refusals[1]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "trian"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--only takes" in proc.stderr


def test_benchmark_input_section_measures_every_pipeline_per_core(tmp_path):
    out = tmp_path / "input.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke",
                           "--only", "input", "--output", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    for key in ("input_img_s_per_core", "input_eval_img_s_per_core", "input_fast_img_s_per_core",
                "input_pil_img_s_per_core", "input_pil_eval_img_s_per_core"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["train_fp32_img_s"] is None  # only the section asked for
    assert "input_img_s_per_core" in proc.stdout


def test_gpu_plan_compiles_training_and_int8_inference_for_an_h100_without_one(tmp_path):
    """benchmarks/gpu_plan.py --smoke: XLA's GPU compiler (JAX's CUDA PJRT plugin, installed
    apart by `make install-test`) compiles for an H100 described by benchmarks/h100_target.txtpb,
    no GPU attached. The training step with backend "triton" keeps its 32 kernel calls (16 and 16
    recomputed under remat) through XLA's GPU pipeline; int8 inference at 32x32 compiles, with its
    larger convolutions as cuDNN int8 convolutions (before convolutions.conv2d_as_dot, the 2x2 and
    1x1 maps failed there: "Can't lower one or more integer convolutions"). The stems compute
    as im2col (config.stem_conv), which compiles there too."""
    plugin = Path(sys.prefix) / "cuda-lowering"
    if not (plugin / "jax_plugins" / "xla_cuda13").is_dir() or not (plugin / "jax_triton").is_dir():
        pytest.skip(f"needs JAX's CUDA PJRT plugin and jax-triton in {plugin} (make install-test)")
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), str(ROOT)]),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_plan.py"), "--smoke",
                           "--stem-conv", "im2col", "--output", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["device"] == "NVIDIA H100 80GB HBM3" and result["batch"] == 8
    assert result["stem_conv"] == "im2col"
    train = result["train"]["fp32/triton/remat=on"]
    assert train["kernel_calls"] == 32
    assert 0 < train["arguments_gib"] < train["planned_peak_gib"] < 2
    assert train["kernels"] > 100 and train["moved_gb"] > 0
    # the kernels' gradients in the parameters' layout: Adam updates the state in place (with
    # cuDNN's layout, the state is written through a temporary and copied: 90 copies here)
    assert train["copies"] < 10
    # per-channel gradients of one length in one array: Adam updates each group in one kernel
    # (measured 821 kernels here; 901 with one update per array)
    assert train["kernels"] < 860
    int8 = result["eval"]["int8/xla"]
    assert int8["cudnn_int8_convs"] == 9 and int8["kernel_calls"] == 0
    # Only a float32 output keeps a convolution of int8 operands in int8 (4 bytes written per
    # value); asked for bfloat16 or float16, XLA converts the operands and convolves floats. If
    # this fails, XLA writes 2-byte floats from int8: int8 inference can then move fewer bytes.
    assert result["int8_conv_outputs"] == {
        "float32": {"int8_operands": True, "writes": "f32"},
        "bfloat16": {"int8_operands": False, "writes": "bf16"},
        "float16": {"int8_operands": False, "writes": "f16"}}
    assert "not a measurement" in proc.stdout and "stem_conv im2col" in proc.stdout


def test_gpu_plan_counts_each_kernels_operands_and_results():
    """moved_gb: operands and results of each instruction of the entry computation that launches
    work (not parameters, tuples, bitcasts), tuples summed, a slice counted by what it reads."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_plan
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    hlo = """%fused_computation (param_0: bf16[80]) -> bf16[80] {
  ROOT %a = bf16[80]{0} add(%param_0, %param_0)
}
ENTRY %main (p: bf16[8,10]) -> (f32[1000], s8[4]) {
  %p = bf16[8,10]{1,0} parameter(0)
  %b = bf16[80]{0} bitcast(%p)
  %loop_fusion = (f32[1000]{0}, s8[4]{0}) fusion(%b, %p), kind=kLoop, calls=%fused_computation
  %g = f32[1000]{0} get-tuple-element(%loop_fusion), index=0
  %loop_slice_fusion = f32[10]{0} fusion(%g), kind=kLoop, calls=%fused_computation
  %custom-call.1 = pred[16]{0} custom-call(%g, %loop_slice_fusion), custom_call_target="x"
  ROOT %t = (f32[1000]{0}, s8[4]{0}) tuple(%g, %custom-call.1)
}
"""
    reads = 160 + 160, 40, 4000 + 40  # loop_fusion, the slice (its result), custom-call
    writes = 4000 + 4, 40, 16
    assert gpu_plan.kernels_and_bytes(hlo) == (3, sum(reads) + sum(writes))


def test_profile_steps_attributes_kernel_time(tmp_path):
    """benchmarks/profile_steps.py: op names (also a fusion's, from inside its computation) and the
    part of the step they belong to; in smoke size it traces inference and sums its kernels."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profile_steps
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    hlo = """%fused_computation.3 (param_0: f32[4]) -> f32[4] {
  %a = f32[4]{0} add(%param_0, %param_0), metadata={op_name="jit(f)/transpose(jvp(Net))/bn1/add"}
}
ENTRY %main (p: f32[4]) -> f32[4] {
  %conv.1 = f32[4]{0} custom-call(%p), metadata={op_name="jit(f)/ResNet50/conv1/conv"}
  ROOT %loop_fusion.2 = f32[4]{0} fusion(%conv.1), kind=kLoop, calls=%fused_computation.3
}"""
    names = profile_steps.op_names(hlo)
    assert names["conv.1"] == "jit(f)/ResNet50/conv1/conv"
    assert names["loop_fusion.2"] == "jit(f)/transpose(jvp(Net))/bn1/add"
    assert [profile_steps.part_of_step(names[k]) for k in ("conv.1", "loop_fusion.2")] == [
        "teacher", "student backward"]
    assert profile_steps.part_of_step("jit(f)/jvp(Net)/conv") == "student forward"
    for kernel in ("ternary_forward_kernel", "ternary_values_kernel"):
        assert profile_steps.category(kernel, "triton_kernel_call.3") == "triton activation"
    assert profile_steps.category("sm90_xmma_fprop", "cudnn-conv.1") == "convolution"
    # kernels inside a command buffer (a CUDA graph) are matched to the fusion named like them
    names = {"loop_add_fusion.3": "a", "loop_add_fusion": "b"}
    of = profile_steps.instruction_of
    assert of("loop_add_fusion_3", "command_buffer_12", names) == "loop_add_fusion.3"
    assert of("loop_add_fusion", "command_buffer_12", names) == "loop_add_fusion"
    assert of("sm90_xmma_fprop", "command_buffer_12", names) == "command_buffer_12"
    assert of("loop_add_fusion_3", "cudnn-conv.1", names) == "cudnn-conv.1"
    # idle time: kernels c and b overlap (two streams); gaps of 2, 132 and 30 us; two steps
    events = [("d", 150_000, 1_000), ("a", 0, 10_000), ("b", 12_000, 3_000), ("c", 13_000, 5_000),
              ("e", 181_000, 1_000)]
    idle = profile_steps.idle_gaps(events, steps=2, listed=2)
    assert idle["span_ms_per_step"] == pytest.approx(0.091)
    assert idle["busy_ms_per_step"] == pytest.approx(0.009)  # 10 + 6 (b, c) + 1 + 1 us, / 2
    assert idle["idle_ms_per_step"] == pytest.approx(0.082)
    assert {k: v["count_per_step"] for k, v in idle["gaps"].items()} == {
        "0-5 us": 0.5, "5-20 us": 0, "20-100 us": 0.5, ">100 us": 0.5}
    assert idle["gaps"][">100 us"]["ms_per_step"] == pytest.approx(0.066)
    assert idle["largest_gaps"] == [{"us": 132.0, "after": "c", "before": "d"},
                                    {"us": 30.0, "after": "d", "before": "e"}]

    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_steps.py"), "--smoke",
                           "--only", "eval_int8_bf16", "--output", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())["programs"]["eval_int8_bf16"]
    assert r["kernels_per_step"] > 0 and r["by_category_ms"].get("convolution", 0) > 0
    # the compiled module's op names were found: most of the time is attributed to the network
    assert r["by_part_ms"].get("other", 0) > r["by_part_ms"].get("unattributed", 0)
    assert any("/STTNResNet18/" in t["op_name"] for t in r["top"])
    idle = r["idle"]
    assert idle["span_ms_per_step"] >= idle["busy_ms_per_step"] > 0
    assert idle["idle_ms_per_step"] == pytest.approx(
        idle["span_ms_per_step"] - idle["busy_ms_per_step"])
    assert idle["largest_gaps"] and "idle" in proc.stdout
    assert "== eval_int8_bf16" in proc.stdout


@pytest.mark.parametrize("size", [32, 33])
def test_benchmark_stem_variants_compute_the_stem_convolution(x64, size):
    """The stem section's rewrites (zero channels, space-to-depth, im2col) are the stem's
    convolution."""
    import runpy

    m = runpy.run_path(str(ROOT / "benchmarks" / "run.py"), run_name="bench")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, size, size + 2, 3))
    k = rng.normal(size=(7, 7, 3, 5))
    from sttn_jax import convolutions

    want = np.asarray(convolutions.conv2d(x, k, 2, 3))
    assert m["STEM_VARIANTS"] == ("3", "4", "8", "space_to_depth", "im2col")
    for variant in m["STEM_VARIANTS"]:
        got = m["stem_conv"](variant)(x, k)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
