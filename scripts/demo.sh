#!/usr/bin/env bash
# Runs gpubridge's main job end to end: an API-format workflow through the local provider, with live
# progress, artifacts written to ./out and a timing summary.
#
# It uses the ComfyUI at $GPUBRIDGE_COMFY_URL when that is set; otherwise it starts gpubridge's ComfyUI
# test double on a free loopback port for the duration of the run (no GPU, no models needed).
#   WORKFLOW=workflows/flux_schnell_t2i.json bash scripts/demo.sh   # another example
set -euo pipefail
cd "$(dirname "$0")/.."
workflow="${WORKFLOW:-workflows/model_free_invert.json}"
out="${OUT:-out}"

if [ -z "${GPUBRIDGE_COMFY_URL:-}" ]; then
  log="$(mktemp)"
  python -m gpubridge.testing.comfy --port 0 >"$log" 2>&1 &
  double=$!
  trap 'kill "$double" 2>/dev/null || true; rm -f "$log"' EXIT
  for _ in $(seq 1 200); do
    url="$(grep -m1 -o 'http://127.0.0.1:[0-9]*' "$log" || true)"
    [ -n "$url" ] && break
    kill -0 "$double" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.05
  done
  [ -n "${url:-}" ] || { echo "the ComfyUI double did not start"; cat "$log"; exit 1; }
  export GPUBRIDGE_COMFY_URL="$url"
  echo "ComfyUI test double at $url"
fi

inputs=()
if grep -q '"LoadImage"' "$workflow"; then
  inputs=(--input "input.png=examples/inputs/input.png")
fi
gpubridge run "$workflow" --provider local --out "$out" "${inputs[@]}"
