#!/usr/bin/env bash
# Issue #2's GPU figures in one go: every model-step variant of ViT-B/16 (224 px, batch 256, bf16)
# with its MFU, and a kernel-time profile of each, on whatever CUDA machine this runs on.
#
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
#
# OpenCLIP, the reference, may travel as wheels in .whl/ (open_clip_torch, ftfy, wcwidth) where the
# machine has no package index. Results: $OUT/model_step_gpu.json, $OUT/model_step.log,
# $OUT/profiles.tgz (one kernel table per variant), $OUT/gpu.txt.
set -uo pipefail
OUT=${OUT:-/tmp/clip-ray-gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/gpu.txt"
# Each variant gets 4 minutes at most (max-autotune compiles longest, so it runs last).
PYTHONUNBUFFERED=1 python3 benchmarks/model_step.py --device cuda --steps 15 --warmup 3 --variant-timeout 240 \
  --json-out "$OUT/model_step_gpu.json" --profile-dir "$OUT/profiles" "$@" 2>&1 | tee "$OUT/model_step.log"
status=${PIPESTATUS[0]}
tar czf "$OUT/profiles.tgz" -C "$OUT" profiles && rm -rf "$OUT/profiles"
exit "$status"
