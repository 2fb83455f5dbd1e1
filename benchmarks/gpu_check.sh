#!/usr/bin/env bash
# The GPU check: the GPU tests and the benchmark on a CUDA GPU (measured target: one H100), in one
# command under 570 s. On one H200 (2026-12-04, cold caches) steps 1 and 2 and a training-only run
# took 242 s.
#
# Run from the repository root on the GPU machine, carrying the wheels of what its image lacks in
# the git-ignored .whl/. Obtain them on a machine with internet access first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       jax-triton==0.3.1 ml_collections==1.1.0
# then run "bash benchmarks/gpu_check.sh" there, carrying .whl.
#
# The machine is expected to have python 3.12, jax 0.11.2 (CUDA), triton 3.6.0, flax, optax, orbax,
# absl-py, humanize, matplotlib, tqdm, torch and pytest, and no internet. (Checked on a CPU on
# 2026-12-02, 2026-12-03 and 2026-12-05: in a Python 3.12 virtual environment holding only those
# packages, at jax 0.11.2 and triton 3.6.0, without torch, and the two wheels, the whole script
# runs with BENCH_ARGS=--smoke and fails only for want of a GPU: no Triton backend; on
# 2026-12-05 in 107 s on the project's 2-core CPU machine, 6 GPU-check tests passed and 2 skipped.)
# This script installs every wheel in .whl (no dependencies) into a private directory and
# nothing else, then:
#   1. the GPU-only tests: pytest -q tests/test_ops.py -k "gpu and not lowers"   (tests.log; the
#      test that lowers for a GPU without one runs in CI, and would cost device time here)
#   2. python benchmarks/run.py --compare-backends --compare-stems --compare-teacher-bn
#      (bench.json, bench.log): the defaults, then each option on and off (the activation's
#      backend, the stem forms, the teacher's BatchNorm on its running statistics; int8 against
#      float inference is in the main run), and a "wins" line per comparison: the fastest
#      setting. The stem forms add about a minute, the teacher's mode one more training step.
#   3. if 80 s are left: python benchmarks/profile_steps.py, where the device time of the bfloat16
#      training and inference steps goes (profile.json; the table in the output)
#   4. if 150 s are left: python benchmarks/run.py --only train --remat on, the training step
#      recomputing in the backward pass, for remat's saving in memory and its cost in speed
#      (bench_remat.json, bench_remat.log)
# Everything lands in $OUT (default ./gpu_check_out), which the device tool brings back: at most
# eight files (env.txt also holds the pip log and the backend check; summary.txt names the
# results file benchmarks/results/ expects). bench.json is rewritten after every measurement, so a run cut short
# still returns what it measured.
#
# Environment knobs: BENCH_ARGS (extra run.py options, e.g. "--steps 10 --warmup 2"),
# SKIP_TESTS=1, TOTAL_TIMEOUT (s for the whole script, default 570: the device tool allows 600 per
# command), TEST_TIMEOUT (s, default 150), JAX_COMPILATION_CACHE_DIR (default /tmp/sttn_jax_cache:
# a rerun on a warm machine compiles less; compile_s in the JSON then says so).
set -uo pipefail
DEADLINE=$((SECONDS + ${TOTAL_TIMEOUT:-570}))
left() { echo $((DEADLINE - SECONDS)); }
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
status=0

log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

# -- environment -----------------------------------------------------------------------------
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  python --version 2>&1
  python - <<'EOF' 2>&1
import importlib.metadata as md
for d in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "triton",
          "torch", "pytest", "tensorflow"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "-")
EOF
} > "$OUT/env.txt"
cat "$OUT/env.txt"
export PYTHONUNBUFFERED=1

# -- the carried wheels, in a private site dir -------------------------------------------------
shopt -s nullglob
wheels=(.whl/*.whl)
site=$(mktemp -d /tmp/sttn_site.XXXXXX)
trap 'rm -rf "$site"' EXIT
if (( ${#wheels[@]} == 0 )); then
  log "no wheels in .whl/ (carry .whl): jax-triton and ml_collections will be missing"
  status=1
else
  python -m pip install --quiet --no-deps --no-index --target "$site" "${wheels[@]}" \
    >> "$OUT/env.txt" 2>&1 || { log "pip install of ${wheels[*]} failed (env.txt)"; status=1; }
fi
export PYTHONPATH="$site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/sttn_jax_cache}
export TF_CPP_MIN_LOG_LEVEL=2

python - > "$OUT/backend.tmp" 2>&1 <<'EOF'
import jax
from ops import ternary
print("devices:", jax.devices())
print("triton unavailable:", ternary.triton_unavailable_reason())
for dt in ("float32", "bfloat16"):
    print("auto ->", dt, ternary.resolve_backend("auto", dt))
EOF
tee -a "$OUT/env.txt" < "$OUT/backend.tmp"
grep -q "triton unavailable: None" "$OUT/backend.tmp" || { log "Triton backend NOT available (env.txt)"; status=1; }
rm -f "$OUT/backend.tmp"

# -- 1. GPU-only tests -------------------------------------------------------------------------
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  if python -c "import pytest" 2>/dev/null; then
    t=$(left); (( t > ${TEST_TIMEOUT:-150} )) && t=${TEST_TIMEOUT:-150}
    timeout "$t" python -m pytest -q -rs tests/test_ops.py -k "gpu and not lowers" -p no:cacheprovider \
      2>&1 | tee "$OUT/tests.log"
    rc=${PIPESTATUS[0]}
    log "gpu tests: exit $rc"
    (( rc == 0 )) || status=1
    grep -qE "[1-9][0-9]* passed" "$OUT/tests.log" || { log "no GPU test passed (all skipped?)"; status=1; }
  else
    log "pytest is not installed here: GPU tests not run"
    status=1
  fi
fi

# -- 2. benchmark ------------------------------------------------------------------------------
t=$(( $(left) - 15 )); (( t < 60 )) && t=60
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout "$t" python benchmarks/run.py --compare-backends --compare-stems --compare-teacher-bn \
  --output "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
log "benchmark: exit $rc"
(( rc == 0 )) || status=1
if [[ -f "$OUT/bench.json" ]]; then
  # The name benchmarks/results/ uses (a copy would be an eighth file: the tool returns eight).
  name=$(python -c "import json, re, sys; r = json.load(open(sys.argv[1])); \
print(r['date'] + '_' + (re.sub('[^a-z0-9]+', '-', r['device']['kind'].lower()).strip('-') or 'device') + '.json')" \
    "$OUT/bench.json") && log "results: commit bench.json as benchmarks/results/$name"
else
  log "no bench.json written"
  status=1
fi
# -- 3. the profile, if there is time (not counted in the exit status) ------------------------
t=$(( $(left) - 10 ))
if (( t >= 70 )); then
  smoke=$([[ " ${BENCH_ARGS:-} " == *" --smoke "* ]] && echo --smoke)
  timeout "$t" python benchmarks/profile_steps.py --only train_bf16,eval_bf16 --top 10 $smoke \
    --output "$OUT/profile.json" 2>&1 | grep -v "DeprecationWarning\|stats = dict"
  log "profile: exit ${PIPESTATUS[0]}"
else
  log "no time left for the profile ($t s)"
fi
# -- 4. the training step with remat, if there is time (not counted in the exit status) -------
t=$(( $(left) - 10 ))
if (( t >= 150 )); then
  # shellcheck disable=SC2086
  timeout "$t" python benchmarks/run.py --only train --remat on \
    --output "$OUT/bench_remat.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_remat.log"
  log "benchmark with remat: exit ${PIPESTATUS[0]}"
else
  log "no time left for the benchmark with remat ($t s)"
fi
log "gpu_check exit $status"
exit $status
