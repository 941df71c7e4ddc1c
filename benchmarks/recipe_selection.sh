#!/usr/bin/env bash
# Issue #21's recipe selection for int4 and the val-set size, on a selection set (seed 2002; never the val seed
# 2000): int4 variants side by side with int8 / int8wo / fp16 in one eval, then ΔAP and its 90% paired-bootstrap
# interval on the first 40, 100 and 200 images. Needs the main job's out/bundle and out/calib.
#   bash benchmarks/recipe_selection.sh [WORK]   → WORK/subsets.json, WORK/eval.md
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/recipe_selection}
CLI=.venv/bin/posellm-edge
CKPT=models/posellm-small
mkdir -p "$W"
.venv/bin/python -m training.data.synthetic --out "$W/set" --num-images 200 --seed 2002 \
  --domain-of "$CKPT/train_config.json"
rm -rf "$W/bundle" && cp -r out/bundle "$W/bundle"
CAL=(--coco out/calib/person_keypoints.json --images out/calib/images --samples 16 --checkpoint "$CKPT")
"$CLI" quantize "$W/bundle" --bits 4 "${CAL[@]}" --name int4_l0 --accuracy-level 0
"$CLI" quantize "$W/bundle" --bits 4 "${CAL[@]}" --name int4_b32 --block-size 32
P=(); for v in int4 int4_l0 int4_b32 int8wo int8 fp16; do P+=(--precision "$v"); done
"$CLI" eval --checkpoint "$CKPT" --bundle "$W/bundle" --coco "$W/set/person_keypoints.json" --images "$W/set/images" \
  --decoding template "${P[@]}" --out "$W/eval.json" --predictions "$W/pred"
.venv/bin/python -m benchmarks.ap_bootstrap "$W/set/person_keypoints.json" "$W/pred" --images 40 100 200 \
  --out "$W/subsets.json"
