#!/usr/bin/env bash
# GPU checks of d2detr::ms_deform_attn in one go, for a machine with an NVIDIA GPU,
# nvcc and a CUDA build of torch (README.md, "Multi-scale deformable attention" > "CUDA").
#
#   OUT=/tmp/msda scripts/device_check.sh          # from the repository root
#
# Steps, each under a timeout and all under one deadline (DEADLINE_S, default 570 s,
# so that the whole script fits a 10-minute command):
#   1. build d2detr._C in place with CUDA for the visible GPU (setup.py's default
#      TORCH_CUDA_ARCH_LIST), and at the same time, elsewhere, a library without this
#      GPU's architecture and without PTX (for step 4);
#   2. the CUDA tests, `-m slow` included, and the CPU file's CUDA cases;
#   3. tools/benchmark_ms_deform_attn.py --device cuda in float32, float16, bfloat16;
#   4. the library without a kernel image for this GPU: the op raises
#      NotImplementedError naming the GPU, ms_deform_attn warns once and returns the
#      reference's result;
#   5. compute-sanitizer --tool memcheck over the CUDA tests (all but the large ones
#      and the graph capture), with torch's caching allocator off so that every tensor
#      is its own allocation and an access past its end is caught.
# Writes at most 8 files under $OUT: summary.txt (one line per step, PASS/FAIL),
# env.txt, build.log, tests.log, bench.md, fallback.log, memcheck.log.
# Exit status: 0 when every step passed.
set -euo pipefail

OUT=${OUT:-$PWD/device_check_out}
PY=${PY:-python3}
DEADLINE_S=${DEADLINE_S:-570}
NO_IMAGE_ARCH=${NO_IMAGE_ARCH:-}  # architecture without a kernel image here; default: see step 1
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH=$CUDA_HOME/bin:$PATH
START=$SECONDS
FAILED=0
: >"$OUT/summary.txt"

# step NAME LIMIT_S LOG CMD...: runs CMD (stdout+stderr appended to LOG) under
# min(LIMIT_S, time left), records PASS/FAIL/TIMEOUT in summary.txt; never exits.
# CMD is a program: the shell functions below are exported and run as `bash -c f`.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((DEADLINE_S - (SECONDS - START)))
  if ((left < 15)); then
    echo "SKIP    $name (deadline reached)" | tee -a "$OUT/summary.txt"
    FAILED=1
    return 0
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS rc=0
  echo "=== $name (limit ${limit}s)" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
  local verdict=PASS
  if ((rc == 124 || rc == 137)); then verdict=TIMEOUT; elif ((rc != 0)); then verdict="FAIL rc=$rc"; fi
  [[ $verdict == PASS ]] || FAILED=1
  printf '%-7s %s (%ds)\n' "$verdict" "$name" $((SECONDS - t0)) | tee -a "$OUT/summary.txt"
}

{
  date -u
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
  nvcc --version | tail -2 || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} >"$OUT/env.txt" 2>&1

# --- 1. builds ----------------------------------------------------------------
CAP=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
if [[ -z $NO_IMAGE_ARCH ]]; then
  # a cubin of another major version does not run here; no PTX is built
  if [[ ${CAP%%.*} == 8 ]]; then NO_IMAGE_ARCH=9.0; else NO_IMAGE_ARCH=8.0; fi
fi
NOIMG=$(mktemp -d /tmp/d2detr_noimg.XXXXXX)
export PY NOIMG NO_IMAGE_ARCH
build_no_image() {
  env TORCH_CUDA_ARCH_LIST="$NO_IMAGE_ARCH" D2DETR_WITH_CUDA=1 \
    "$PY" setup.py -q build_ext --build-lib "$NOIMG/lib" --build-temp "$NOIMG/temp" >"$NOIMG/build.log" 2>&1
}
build_default() {
  (unset TORCH_CUDA_ARCH_LIST; D2DETR_WITH_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} "$PY" setup.py -q build_ext --inplace)
}
build_both() {
  build_no_image &
  local pid=$! rc=0
  build_default || rc=$?
  wait "$pid" || echo "(the build without this GPU's kernel image failed: $NOIMG/build.log)"
  cat "$NOIMG/build.log"
  return $rc
}
export -f build_no_image build_default build_both
step "build d2detr._C for the visible GPU (sm_${CAP/./}) + one without its kernel image (${NO_IMAGE_ARCH})" \
  360 "$OUT/build.log" bash -c build_both
LIB=$(ls d2detr/_C*.so 2>/dev/null | head -1 || true)
if [[ -z $LIB ]]; then
  echo "no d2detr/_C*.so was built: stopping" | tee -a "$OUT/summary.txt"
  exit 1
fi
{
  echo "TORCH_CUDA_ARCH_LIST chosen by setup.py:"
  grep -o "TORCH_CUDA_ARCH_LIST=[^)]*" "$OUT/build.log" | head -1 || true
  echo "kernel images in $LIB (cuobjdump):"
  cuobjdump --list-elf --list-ptx "$LIB" 2>&1 | head -20 || true
} >>"$OUT/env.txt" 2>&1

# --- 2. tests -------------------------------------------------------------------
step "pytest: CUDA tests incl. -m slow, and the CPU file's CUDA cases" 240 "$OUT/tests.log" \
  "$PY" -m pytest -q -rs --durations=15 -p no:cacheprovider -m "slow or not slow" \
  tests/test_ms_deform_attn_cuda.py "tests/test_ms_deform_attn.py::test_location_gradient_at_pixel_minus_one"

# --- 3. benchmark ---------------------------------------------------------------
bench_all() {
  local dt rc=0
  for dt in float32 float16 bfloat16; do
    "$PY" tools/benchmark_ms_deform_attn.py --device cuda --dtype "$dt" || rc=$?
    echo
  done
  return $rc
}
export -f bench_all
step "benchmark (float32, float16, bfloat16)" 200 "$OUT/bench.md" bash -c bench_all

# --- 4. no kernel image: clear error, fallback -----------------------------------
cat >"$NOIMG/check_no_image.py" <<'EOF'
import warnings

import torch

import d2detr.layers.ms_deform_attn as msda

assert msda.__file__.startswith(__import__("os").environ["PYTHONPATH"]), msda.__file__
assert msda.native_ms_deform_attn_available("cuda"), "the library has no CUDA kernel registered"
g = torch.Generator().manual_seed(0)
shapes = torch.tensor([[6, 5], [3, 2]])
starts = torch.tensor([0, 30])
value = torch.randn(2, 36, 2, 8, generator=g)
loc = torch.rand(2, 7, 2, 2, 3, 2, generator=g)
attn = torch.rand(2, 7, 2, 2, 3, generator=g)
args = [t.cuda() for t in (value, shapes, starts, loc, attn)]
try:
    torch.ops.d2detr.ms_deform_attn(*args)
except NotImplementedError as e:
    print("raw op:", str(e).splitlines()[0])
    assert msda._NO_KERNEL_IMAGE_MESSAGE in str(e), e
else:
    raise AssertionError("the op ran although the library has no kernel image for this GPU")
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    out = msda.ms_deform_attn(*args)
    out2 = msda.ms_deform_attn(*args)
msgs = [str(r.message) for r in rec if "native ms_deform_attn unavailable" in str(r.message)]
print("warning:", msgs)
assert len(msgs) == 1, msgs
expected = msda.ms_deform_attn_reference(*args)
torch.testing.assert_close(out, expected, rtol=0, atol=0)
torch.testing.assert_close(out2, expected, rtol=0, atol=0)
torch.cuda.synchronize()  # the failed launch left no sticky error
print("OK: NotImplementedError, one warning, the reference's result")
EOF
check_no_image() {
  local pkg="$NOIMG/pkg"
  local so
  so=$(ls "$NOIMG"/lib/d2detr/_C*.so | head -1)
  mkdir -p "$pkg"
  cp -r d2detr "$pkg/"
  rm -f "$pkg"/d2detr/_C*.so
  cp "$so" "$pkg/d2detr/"
  PYTHONPATH="$pkg" "$PY" "$NOIMG/check_no_image.py"
}
export -f check_no_image
step "no kernel image (library built for ${NO_IMAGE_ARCH} only): error + fallback" 90 "$OUT/fallback.log" \
  bash -c check_no_image

# --- 5. compute-sanitizer memcheck ------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
# Not under memcheck: the large cases (slow, grid-stride: minutes there) and the
# CUDA-graph capture (no cudaMalloc during a capture, and uncached torch allocates).
step "compute-sanitizer --tool memcheck, CUDA tests (not slow, grid-stride, graph)" 300 "$OUT/memcheck.log" \
  env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 50 \
  --target-processes all "$PY" -m pytest -q -x -p no:cacheprovider -m "not slow" \
  -k "not grid_stride and not cuda_graph" \
  tests/test_ms_deform_attn_cuda.py "tests/test_ms_deform_attn.py::test_location_gradient_at_pixel_minus_one"
grep -E "ERROR SUMMARY|========= (Invalid|Program hit)" "$OUT/memcheck.log" | head -5 | sed 's/^/        /' \
  | tee -a "$OUT/summary.txt" || true

echo "total $((SECONDS - START)) s" | tee -a "$OUT/summary.txt"
rm -rf "$NOIMG"
exit $FAILED
