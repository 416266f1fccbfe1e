#!/usr/bin/env bash
# A GPU session's checks and benchmarks, in stages that each fit one call of the device tool
# (10 minutes a call; 15 minutes of device time a session, machine starts included).
#
#   bash bench/gpu_session.sh STAGE [STAGE ...]    # there, from the repository root
#
# The H200 machine of 2026-12-04 had torch 2.11, Triton 3.6, torchvision, pytest, pytest-xdist,
# hypothesis, pytest-benchmark and safetensors, and no package registry. Where the test packages are
# missing, `make gpu-deps` (here, once) puts them for CPython 3.12 in .gpu_deps/, which the device
# call must then carry. Everything lands in $OUT (the device tool's folder), else out/gpu:
# tests.log + tests.xml, cuda.jsonl (bench rows), conv_dispatch.json (the tuned table), *.log.
# Each stage runs under `timeout $STAGE_SECONDS` (default 540 s; stage `first` gives each part its
# own share), so a slow stage still returns what it measured (bench rows are appended per
# measurement point); the script exits 1 when any stage failed or timed out. The tests run on
# pytest-xdist workers when it is installed (Triton compiles in each worker: TEST_WORKERS, default 8).
#
# Stages, in the order a first GPU session should run them:
#   first    - one device call of at most 8 minutes: env, tests (180 s), threshold + prompt (90 s),
#              the stage-1 step at B=256 and slim (130 s), ResNet-18 convs bf16 B=256 untuned (80 s)
#   recheck  - a second call of about 6 minutes: the tests fixed after `first`, bench/threshold_radix.py's
#              schedules, prompt at B=256, the bf16 channels_last step at B=256, threshold with 10 repeats
#   second   - a later session's 9-minute call: threshold tests and rows after the 8-bit and layer-scope
#              changes, the step with them, a profile of the bf16 channels_last step (bench/profile_step.py),
#              vpns tune + the tuned conv dispatch for ResNet-18 bf16 B=256
#   third    - session 19's 5-minute call: the region input-gradient tests natively, the step (with and
#              without the narrowed input gradient), the profile of the bf16 channels_last step
#   env      - device, driver and versions (seconds)
#   tests    - the Triton kernel tests natively (no interpreter): ops, conv, batching, dispatch
#   kernels  - bench threshold, prompt, masked (eager baselines; --no-compile)
#   tune     - vpns tune: ResNet-18 masked-conv dispatch table, batch 64/256, bf16 and fp32, channels_last
#   conv     - bench conv on ResNet-18 shapes, unstructured scores, with the tuned table (--no-compile)
#   conv_all - bench conv on every other shape and granularity
#   step     - bench train_step (stage-1 step with the dispatcher) and bench slim
#   compiled - the torch.compile baselines of prompt, masked and slim (slow: compiles per shape)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
STAGE_SECONDS=${STAGE_SECONDS:-540}
export PYTHONPATH=".:.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
export VPNS_FAST_CONV_TABLE="$OUT/conv_dispatch.json"
# Triton's compile cache in the tree: it survives between calls while the machine stays warm.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
ROWS="$OUT/cuda.jsonl"

# The device tool returns at most 8 files from $OUT: where a session wrote more, they go back as one
# archive (gpu_session.tar.gz), packed on any exit of this script.
pack_out() {
    if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
        local archive="/tmp/gpu_session.$$.tar.gz"
        tar czf "$archive" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv "$archive" "$OUT/gpu_session.tar.gz"
    fi
}
trap pack_out EXIT

FAILED=""
run() {  # run NAME COMMAND...: time-limited, output to the terminal and $OUT/NAME.log
    local name=$1 status
    shift
    echo "== $name: $*"
    timeout "$STAGE_SECONDS" "$@" 2>&1 | tee -a "$OUT/$name.log"
    status=${PIPESTATUS[0]}
    echo "== $name: exit $status$([ "$status" = 124 ] && echo ' (timed out)')"
    [ "$status" = 0 ] || FAILED="$FAILED $name"
}

stage_env() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/env.log"
    "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.log"
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("pytest", "hypothesis", "safetensors", "torchvision", "numpy"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as error:
        print(name, "MISSING:", error)
EOF
}

native_tests() {  # native_tests TEST...: the tests natively, one igemm config (no autotuning per test shape)
    local parallel=()
    "$PY" -c 'import xdist' 2> /dev/null && parallel=(-n "${TEST_WORKERS:-8}")
    "$PY" -c 'import pytest_timeout' 2> /dev/null && parallel+=(--timeout 150)
    VPNS_FAST_IGEMM_AUTOTUNE=0 run tests "$PY" -m pytest -q -p no:cacheprovider -rfE "${parallel[@]}" \
        --junitxml="$OUT/tests.xml" "$@"
}

stage_tests() {  # the Triton kernel tests natively; the compile-only check is CI's
    native_tests tests/kernels/test_triton_prompt.py tests/kernels/test_triton_threshold.py \
        tests/kernels/test_triton_masked.py tests/kernels/test_triton_masked_conv.py tests/nn/test_mask_batching.py \
        tests/ops/test_conv_dispatch.py tests/ops/test_ops_prompt.py tests/ops/test_ops_threshold.py \
        tests/ops/test_ops_masked.py tests/ops/test_backends.py
}

stage_kernels() {
    run kernels "$PY" -m bench threshold prompt masked --device cuda --no-compile --out "$ROWS"
}

stage_tune() {
    run tune "$PY" -m vpns_fast tune --model resnet18 --batch 64,256 --amp bf16 --channels-last --stage all
    run tune "$PY" -m vpns_fast tune --model resnet18 --batch 64,256 --channels-last --stage all
}

stage_conv() {
    run conv "$PY" -m bench conv --device cuda --no-compile --repeats 30 --match '^resnet18 .*unstructured$' --out "$ROWS"
}

stage_conv_all() {
    run conv_all "$PY" -m bench conv --device cuda --no-compile --repeats 30 --match '^resnet50|(kernel|channel)$' \
        --out "$ROWS"
}

stage_step() {
    run step "$PY" -m bench train_step slim --device cuda --no-compile --out "$ROWS"
}

stage_first() {  # the first session's one call: what the project lacks most, in order of need
    stage_env
    STAGE_SECONDS=180 stage_tests
    STAGE_SECONDS=90 run kernels "$PY" -m bench threshold prompt --device cuda --no-compile --repeats 50 \
        --out "$ROWS"
    STAGE_SECONDS=130 run step "$PY" -m bench train_step slim --device cuda --no-compile --repeats 20 \
        --match 'B=256 224px|channel_density' --out "$ROWS"
    # ResNet-18's convs in bf16 at B=256 with one igemm config (no autotuning: it compiles ~10 per shape)
    VPNS_FAST_IGEMM_AUTOTUNE=0 STAGE_SECONDS=80 run conv "$PY" -m bench conv --device cuda --no-compile \
        --repeats 20 --dtype bf16 --match '^resnet18 .*x=\[256,.*unstructured$' --out "$ROWS"
}

stage_recheck() {  # a second call after `first`: the fixed tests, the radix schedules, the rows it missed
    stage_env
    STAGE_SECONDS=70 native_tests tests/kernels/test_triton_threshold.py tests/ops/test_ops_threshold.py \
        tests/ops/test_conv_dispatch.py
    STAGE_SECONDS=130 run radix "$PY" -m bench.threshold_radix --out "$OUT/threshold_radix.jsonl"
    STAGE_SECONDS=50 run kernels "$PY" -m bench prompt --device cuda --no-compile --repeats 50 --match 'B=256' \
        --out "$ROWS"
    STAGE_SECONDS=40 run step "$PY" -m bench train_step --device cuda --no-compile --repeats 20 --dtype bf16 \
        --match 'B=256 224px pad=16 channels_last' --out "$ROWS"
    STAGE_SECONDS=70 run kernels "$PY" -m bench threshold --device cuda --no-compile --repeats 10 --out "$ROWS"
}

stage_second() {  # a later session's one call: what the first two did not measure (bench/results/GPU.md)
    stage_env
    STAGE_SECONDS=70 native_tests tests/kernels/test_triton_threshold.py tests/ops/test_ops_threshold.py \
        tests/ops/test_conv_dispatch.py tests/test_environment.py tests/training/test_config_file.py \
        tests/deploy/test_deploy.py::test_cuda_matches_the_masked_model
    STAGE_SECONDS=70 run kernels "$PY" -m bench threshold --device cuda --no-compile --repeats 10 --out "$ROWS"
    STAGE_SECONDS=100 run step "$PY" -m bench train_step --device cuda --no-compile --repeats 20 \
        --match 'B=256 224px' --out "$ROWS"
    STAGE_SECONDS=30 run kernels "$PY" -m bench prompt --device cuda --no-compile --repeats 50 \
        --match 'B=256 .*bf16-out' --out "$ROWS"
    STAGE_SECONDS=60 run profile "$PY" -m bench.profile_step --out "$OUT/profile" --steps 10
    STAGE_SECONDS=100 run tune "$PY" -m vpns_fast tune --model resnet18 --batch 256 --amp bf16 --channels-last \
        --stage all
    STAGE_SECONDS=90 run conv "$PY" -m bench conv --device cuda --no-compile --repeats 20 --dtype bf16 \
        --match '^resnet18 .*x=\[256,.*unstructured$' --out "$ROWS"
}

stage_third() {  # session 19's call: the first convolution's input gradient narrowed to the prompt's frame
    stage_env
    STAGE_SECONDS=60 native_tests tests/ops/test_region_grad.py tests/nn/test_prompt_modules.py
    STAGE_SECONDS=150 run step "$PY" -m bench train_step --device cuda --no-compile --repeats 20 \
        --match 'B=256 224px' --out "$ROWS"
    STAGE_SECONDS=80 run profile "$PY" -m bench.profile_step --out "$OUT/profile" --steps 10
}

stage_compiled() {
    run compiled "$PY" -m bench prompt masked slim --device cuda --out "$ROWS"
}

if [ $# -eq 0 ]; then
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"
    exit 2
fi
for stage in "$@"; do
    if ! declare -F "stage_$stage" > /dev/null; then
        echo "unknown stage $stage (first recheck second third env tests kernels tune conv conv_all step compiled)" >&2
        exit 2
    fi
    "stage_$stage"
done
if [ -n "$FAILED" ]; then
    echo "failed or timed out:$FAILED" >&2
    exit 1
fi
