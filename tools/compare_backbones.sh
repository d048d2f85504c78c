#!/usr/bin/env bash
# Train the quickstart detector (Mask R-CNN, synthetic set, random init) with
# several backbones under the same budget and print their COCO AP, e.g. to
# compare LeViT's two attention modes or ViP with PVT v2.
#   bash tools/compare_backbones.sh [ITERATIONS]        (default 150)
# Results: output/compare/<name>/quickstart_summary.json
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-150}
PY=${PY:-.venv/bin/python}
run() {
  local name=$1; shift
  "$PY" tools/quickstart.py SOLVER.MAX_ITER "$ITERS" SOLVER.STEPS "()" SOLVER.CHECKPOINT_PERIOD 100000 \
    OUTPUT_DIR "output/compare/$name" "$@" > "output/compare/$name.log" 2>&1
  "$PY" -c "import json; s = json.load(open('output/compare/$name/quickstart_summary.json')); \
print(f\"$name: box AP {s['box_AP']:.1f} | mask AP {s['mask_AP']:.1f} | {s['minutes']} min\")"
}
mkdir -p output/compare
run pvt_v2_b0
run levit_128s_window MODEL.PVT_D2.ARCH levit_128s MODEL.PVT_D2.LEVIT.ATTN_MODE window MODEL.PVT_D2.LEVIT.NORM BN
run levit_128s_global MODEL.PVT_D2.ARCH levit_128s MODEL.PVT_D2.LEVIT.ATTN_MODE global MODEL.PVT_D2.LEVIT.NORM BN
run vip_s7 MODEL.PVT_D2.ARCH vip_s7
