#!/usr/bin/env bash
# Build the refiner's TensorRT engine on a GPU host (run it on the machine that will use the engine:
# engines are specific to the GPU model and the TensorRT version).
#
#   deploy/build_engine.sh OUT.plan [--bundle BUNDLE | --profile tiny|paper] [--weights DIR]
#                          [--image-size 512] [--batch 2] [--text-share 0.4] [--fp32]
#
# 1. exports the UNet (dual attention, text share baked in, static shapes) to OUT.onnx with
#    `spikevaediff export-unet --format onnx`;
# 2. builds OUT.plan from it: with the TensorRT Python API (`export-unet --format tensorrt`) when
#    `import tensorrt` works, otherwise with `trtexec` if it is on PATH (static shapes, fp16), then
#    writes the OUT.plan.json sidecar the tensorrt backend reads.
# Use it with: refiner settings backend "tensorrt", backend_path OUT.plan (or --backend tensorrt).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
out="$1"; shift
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$([ -x "$here/../.venv/bin/python" ] && echo "$here/../.venv/bin/python" || echo python3)}"
cli=("$py" -m spikevaediff.services.cli)

fp16=1
args=()
for arg in "$@"; do
    [[ "$arg" == "--fp32" ]] && fp16=0
    args+=("$arg")
done

if "$py" -c "import tensorrt" 2>/dev/null; then
    exec "${cli[@]}" export-unet --format tensorrt --out "$out" "${args[@]}"
fi

if ! command -v trtexec >/dev/null 2>&1; then
    echo "build_engine: error: neither the tensorrt Python package nor trtexec is available here" >&2
    exit 2
fi

onnx="${out%.*}.onnx"
onnx_args=()
for arg in "${args[@]}"; do [[ "$arg" != "--fp32" ]] && onnx_args+=("$arg"); done
"${cli[@]}" export-unet --format onnx --out "$onnx" --device cuda "${onnx_args[@]}"
precision=(); [[ $fp16 == 1 ]] && precision=(--fp16)
trtexec --onnx="$onnx" --saveEngine="$out" "${precision[@]}" --skipInference
"$py" - "$onnx" "$out" "$fp16" <<'PY'
import subprocess, sys
from spikevaediff.core.unet_tensorrt import write_sidecar
version = subprocess.run(["trtexec", "--help"], capture_output=True, text=True).stdout.splitlines()[:1]
path = write_sidecar(sys.argv[1], sys.argv[2], fp16=sys.argv[3] == "1", built_by="trtexec",
                     tensorrt=version[0] if version else "")
print(f"wrote {sys.argv[2]} and {path}")
PY
