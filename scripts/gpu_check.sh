#!/usr/bin/env bash
# Issue 11's GPU checks in one command, for a session that is lent a GPU machine (15 minutes of device time, at
# most 10 a call): the tests that compare GPU and CPU results, then the throughput of the bare pass and of the full
# suite in float32 and bfloat16 (`benchmarks/perf/bench_pass.py`), then the capacity of a 1M x 2304 decoder
# (`benchmarks/perf/bench_capacity.py`, time and peak GPU memory), each step under its own time limit (together
# at most 560 s with the install, inside one call's 600), each step's output in $OUT/STEP.log. The script stops when
# CUDA is not usable.
#
# Before the call, here: `make install && scripts/gpu_wheels.sh` (the wheels the machine lacks, into .whl/). Then the
# device tool's run, with carry [".whl"] and timeout_s 600:
#     bash scripts/gpu_check.sh
# Steps can be named, to run fewer or to add `suite` (bench_suite.py family by family, limit 200 s):
#     bash scripts/gpu_check.sh tests capacity
# Here, without a GPU, the same steps at tiny sizes on the CPU, with this checkout's .venv (what the test suite runs):
#     scripts/gpu_check.sh --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(env tests pass capacity)
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
: > "$OUT/summary.log"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

if (( smoke )); then
  PY=.venv/bin/python DEVICE=cpu NO_TIME_LIMIT=1
  PASS_ARGS=(--layers 2 --d-model 64 --d-sae 512 --vocab 512 --tokens 2048 --batch-size 16)
  CAPACITY_ARGS=(--width 8192 --d-in 256)
else
  PY=python3 DEVICE=cuda NO_TIME_LIMIT=0
  timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$OUT/pip.log" 2>&1 \
    || { cat "$OUT/pip.log"; echo "installing the carried wheels (.whl, from scripts/gpu_wheels.sh) failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  # GPT-2-small-sized: 12 layers, d_model 768, two TopK SAEs of 24,576 latents (k 32); 131,072 scored tokens
  PASS_ARGS=(--layers 12 --d-model 768 --d-sae 24576 --vocab 50257 --tokens 131072 --batch-size 64)
  CAPACITY_ARGS=(--width 1048576 --d-in 2304)
fi

# step NAME SECONDS COMMAND...: run COMMAND under a time limit (none in a smoke run), its output to $OUT/NAME.log;
# returns COMMAND's exit status
step() {
  local name=$1 seconds=$2; shift 2
  local start=$SECONDS
  if (( NO_TIME_LIMIT )); then
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
  else
    echo "== $name (limit ${seconds} s): $*"
    timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
  fi
  local code=${PIPESTATUS[0]}
  echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$OUT/summary.log"
  return "$code"
}

for name in "${steps[@]}"; do
  case $name in
    env)  # without a usable GPU every later step would only spend the device time: stop
      step env 40 bash -c "nvidia-smi || true; $PY -c 'import torch, sae_lens, transformer_lens, transformers, saebench_poly
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())
print(\"sae_lens\", sae_lens.__version__, \"transformers\", transformers.__version__, \"saebench_poly\", saebench_poly.__file__)
assert $smoke or torch.cuda.is_available(), \"CUDA is not usable here\"'" || exit 1 ;;
    tests) step tests 110 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py tests/test_polysemanticity.py ;;
    pass)
      step pass-float32 100 "$PY" benchmarks/perf/bench_pass.py --device "$DEVICE" --dtype float32 "${PASS_ARGS[@]}"
      step pass-bfloat16 100 "$PY" benchmarks/perf/bench_pass.py --device "$DEVICE" --dtype bfloat16 "${PASS_ARGS[@]}" ;;
    capacity) step capacity 150 "$PY" benchmarks/perf/bench_capacity.py --device "$DEVICE" "${CAPACITY_ARGS[@]}" ;;
    suite) step suite 200 "$PY" benchmarks/perf/bench_suite.py --device "$DEVICE" --case all --repeats 1 \
             --tokens $(( smoke ? 1024 : 65536 )) --bert-tokens $(( smoke ? 512 : 32768 )) ;;
    *) echo "unknown step $name (env, tests, pass, capacity, suite)"; exit 2 ;;
  esac
done
cat "$OUT/summary.log"
