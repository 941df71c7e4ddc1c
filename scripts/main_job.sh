#!/usr/bin/env bash
# The main job on the shipped small model: export → calibrate int8 → quantize int4/int8wo → run (with a drawing)
# → eval (COCO AP, then MPII PCKh with the zero-shot MPII keypoint set) → bench (both side by side).
# Creates .venv on first use; everything lands in $OUT (default: out/).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-out}
CKPT=${CKPT:-models/posellm-small}
if [ ! -x "$VENV/bin/posellm-edge" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[export,bench,video]'
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import scipy, av" 2>/dev/null; then  # a venv made before MPII (scipy) and video (PyAV) support
  "$PY" -m pip install -q -e '.[export,bench,video]'
fi
CLI="$VENV/bin/posellm-edge"
mkdir -p "$OUT"
start=$(date +%s)

# 200 images (~290 persons; the first 40 are the model's own val set): on 40, ΔAP's 90% bootstrap interval spans
# ~2.3 AP, wider than the ±1 AP a precision is held to; on 200 ~1 AP (recipe selection set, seed 2002:
# benchmarks/results/cpu-small-recipe-selection.json)
echo "== held-out synthetic val set (same generator and seed as the model's val set)"
"$PY" -m training.data.synthetic --out "$OUT/val" --num-images "${VAL_IMAGES:-200}" --seed 2000 \
  --domain-of "$CKPT/train_config.json"
ANN="$OUT/val/person_keypoints.json"
IMAGES="$OUT/val/images"

echo "== calibration set: the same domain, another seed (calibrate and quantize never see the val images)"
"$PY" -m training.data.synthetic --out "$OUT/calib" --num-images "${CALIB_IMAGES:-24}" --seed 2003 \
  --domain-of "$CKPT/train_config.json"
CALIB=(--coco "$OUT/calib/person_keypoints.json" --images "$OUT/calib/images")

echo "== held-out synthetic MPII-format set (16 joints by name: 4 never trained on; head boxes; gt_valid.mat)"
"$PY" -m training.data.synthetic --mpii --out "$OUT/mpii" --num-images "${MPII_IMAGES:-12}" --seed 2001 \
  --domain-of "$CKPT/train_config.json"

echo "== export (fp32 + fp16, validated against PyTorch)"
"$CLI" export "$CKPT" "$OUT/bundle" --precision fp32,fp16 --max-persons 4 --overwrite

echo "== calibrate int8 (vision W8A8, decoder weight-only int8)"
"$CLI" calibrate "$OUT/bundle" "${CALIB[@]}" --samples 32

echo "== quantize the decoder weight-only: int4 (lm_head int8) and int8 (GPTQ on person crops, block 64; MatMulNBits + Q/DQ)"
"$CLI" quantize "$OUT/bundle" --bits 4 "${CALIB[@]}" --samples 16 --checkpoint "$CKPT"
"$CLI" quantize "$OUT/bundle" --bits 8 "${CALIB[@]}" --samples 16 --checkpoint "$CKPT"

echo "== run on one image, with a drawing (the image with the largest person; every person of it drawn)"
mapfile -t RUN_ARGS < <("$PY" - "$ANN" "$IMAGES" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
a = max(d["annotations"], key=lambda a: a["area"])
print("--image"); print(sys.argv[2] + "/" + next(i["file_name"] for i in d["images"] if i["id"] == a["image_id"]))
for b in (b for b in d["annotations"] if b["image_id"] == a["image_id"]):
    print("--box"); print(",".join(f"{v:.1f}" for v in b["bbox"]))
PY
)
"$CLI" run "$OUT/bundle" "${RUN_ARGS[@]}" --draw "$OUT/sample.png" --json "$OUT/sample.json"

echo "== video: a 3 s synthetic walking figure, detector boxes, speculative digits (answers = template decoding's)"
"$PY" -m training.data.video --out "$OUT/video" --seconds 3 --fps 10
"$CLI" run "$OUT/bundle" --video "$OUT/video/video.mp4" --detections "$OUT/video/detections.json" --det-score 0.5 \
  --out "$OUT/video/pose.mp4" --json "$OUT/video/pose.jsonl"

echo "== eval: reference vs every variant (fp32, fp16, int8, int4, int8wo × free, template)"
"$CLI" eval --checkpoint "$CKPT" --bundle "$OUT/bundle" --coco "$ANN" --images "$IMAGES" --out "$OUT/eval.json"

echo "== eval MPII: PCKh (Mean, Mean@0.1, zero-shot joints) of the reference and every variant, LocLLM's pred_kpt.json"
"$CLI" eval --checkpoint "$CKPT" --bundle "$OUT/bundle" --mpii "$OUT/mpii/annot/valid.json" \
  --headboxes "$OUT/mpii/annot/gt_valid.mat" --images "$OUT/mpii/images" \
  --out "$OUT/eval_mpii.json" --predictions "$OUT/mpii_pred"

echo "== bench: latency / throughput / memory, reference baseline in the same run"
"$CLI" bench "$OUT/bundle" --checkpoint "$CKPT" --coco "$ANN" --images "$IMAGES" --eval "$OUT/eval.json" \
  --eval "$OUT/eval_mpii.json" --out "$OUT/bench.json" --plot "$OUT/bench.png"

echo "== done in $(( $(date +%s) - start ))s: $OUT/{sample.png,eval.md,eval_mpii.md,bench.json,bench.png,video/pose.mp4,video/pose.jsonl}"
