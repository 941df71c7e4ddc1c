#!/usr/bin/env bash
# Full-size GPU check on any CUDA host (one NVIDIA GPU with >= 40 GB for the default 8 layers): posellm-7b width,
# LAYERS of its 32 LLM layers, fp16 bundle exported there; onnxruntime's CUDA EP (IO binding, logits on the device)
# vs the reference recipe (HF generate, 17 prompts) and plain PyTorch fp16, same crops, one process
# (benchmarks/gpu_fullsize.py). Time and memory grow about linearly with LAYERS: the JSON's scaling_note says how.
#
# Install (a fresh venv; torch from PyPI is a CUDA build on Linux x86-64):
#   pip install -e '.[export]'
#   pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu>=1.18'   # the CPU package would shadow the GPU one
#   python -c "import onnxruntime as o; print(o.get_available_providers())"  # must list CUDAExecutionProvider
# A LLaMA tokenizer directory (tokenizer.json, tokenizer.model, tokenizer_config.json; the real 32000-token vocab).
#
# Run:
#   TOKENIZER=/path/to/llama-tokenizer bash benchmarks/gpu_fullsize.sh
# Knobs (environment): LAYERS (8), CROPS (5), PRESET (posellm-7b), VALIDATE=0 (skip the export's fp32 CPU
# validation), PY_TIMEOUT (seconds before the python step is stopped; it still writes what it measured), WORK (scratch,
# removed at the end), OUT (results folder), PYTHON, DEVICE=cpu (a small CPU smoke of the same path).
# Writes: $OUT/gpu_fullsize.json (token agreement, first-step logit diff, ms/person by stage, speedups, export
# seconds, peak host and GPU memory), $OUT/gpu_fullsize.log, $OUT/env.txt. Keep the JSON as
# benchmarks/results/gpu_fullsize-<device>.json.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/gpu_fullsize_out}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-posellm-7b}
LAYERS=${LAYERS:-8}
CROPS=${CROPS:-5}
TOKENIZER=${TOKENIZER:-.gpu-tokenizer}
WORK=${WORK:-/tmp/gpu_fullsize}
PY_TIMEOUT=${PY_TIMEOUT:-3600}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
[ -f "$TOKENIZER/tokenizer.json" ] || { echo "no $TOKENIZER/tokenizer.json: set TOKENIZER to a LLaMA tokenizer directory"; exit 2; }
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  echo "onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu instead of onnxruntime (see the header)"
  exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

{ date -u; nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1
  free -g; df -h /tmp .; nproc
  "$PYTHON" -c "import onnxruntime as o, torch; print('ort', o.__version__, o.__file__, o.get_available_providers()); print('torch', torch.__version__, torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

rm -rf "$WORK"
args=(--preset "$PRESET" --layers "$LAYERS" --crops "$CROPS" --device "$DEVICE" --tokenizer "$TOKENIZER"
      --work "$WORK" --out "$OUT/gpu_fullsize.json")
[ "${VALIDATE:-1}" = 0 ] && args+=(--skip-validate)
# SIGTERM at PY_TIMEOUT lets the script write its JSON (status "failed", what it measured so far); KILL 20 s later
timeout -s TERM -k 20 "$PY_TIMEOUT" "$PYTHON" -m benchmarks.gpu_fullsize "${args[@]}" 2>&1 | tee "$OUT/gpu_fullsize.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
echo "gpu_fullsize exit $rc"
exit "$rc"
