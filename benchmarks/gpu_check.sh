#!/usr/bin/env bash
# Issue #2's GPU figures in one go: every model-step variant of ViT-B/16 (224 px, batch 256, bf16)
# with its MFU, and a kernel-time profile of each, on whatever CUDA machine this runs on; then, in
# what is left of BUDGET_S, issue #12's: ViT-H/14 under FSDP (bf16, checkpointed, 256 a GPU, one
# process per visible GPU), its memory per rank and throughput.
#
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
#
# OpenCLIP, the reference, may travel as wheels in .whl/ (open_clip_torch, ftfy, wcwidth) where the
# machine has no package index. Results: $OUT/model_step_gpu.json, $OUT/model_step.log,
# $OUT/profiles.tgz (one kernel table per variant), $OUT/gpu.txt, $OUT/fsdp_gpu.json, $OUT/fsdp.log.
set -uo pipefail
OUT=${OUT:-/tmp/clip-ray-gpu-check}
# The whole script's time (a device call's 10 minutes, less the start); the FSDP part gets at most
# FSDP_S of what the first part leaves, and is skipped when under 90 s is left.
BUDGET_S=${BUDGET_S:-570}
FSDP_S=${FSDP_S:-180}
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

# Last, so that it can only shorten itself: ViT-H/14 under FSDP (benchmarks/fsdp_step.py).
left=$((BUDGET_S - SECONDS - 10))
fsdp_s=$((left < FSDP_S ? left : FSDP_S))
if ((fsdp_s >= 90)); then
  PYTHONUNBUFFERED=1 timeout -k 10 "$fsdp_s" python3 benchmarks/model_step.py --device cuda --sharded \
    --variant-timeout $((fsdp_s - 15)) --json-out "$OUT/fsdp_gpu.json" 2>&1 | tee "$OUT/fsdp.log"
  fsdp_status=${PIPESTATUS[0]}
  ((fsdp_status == 124)) && echo "FSDP part: stopped at its ${fsdp_s} s" | tee -a "$OUT/fsdp.log"
else
  echo "FSDP part skipped: ${left} s left of BUDGET_S=${BUDGET_S}" | tee "$OUT/fsdp.log"
fi
exit "$status"
