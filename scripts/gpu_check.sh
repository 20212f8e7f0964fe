#!/usr/bin/env bash
# GPU throughput check of issue 17 point 5, as one script: the bare forward (bench_encoders.py) and
# the caching pipeline against bare forward and the naive per-slice loop (bench_cache.py), on CUDA,
# with the job's own CUDA path: channels_last for CNNs, bf16 autocast, pinned staging buffers and
# non_blocking copies (slice2vol/extract.py), batch size from the pick_batch_size probe.
# Targets (issue 17): pipeline >= 0.95 x bare GPU forward, >= 10x the naive loop.
#
# Writes into $OUT (default gpu-check/): nvidia-smi.txt, env.txt, encoders_fp32.{log,json},
# encoders_bf16.{log,json}, cache_bf16.{log,json}, summary.txt. Run from the repository root:
#
#   OUT=/tmp/gpu IXI=/path/to/ixi-hh-2mm bash scripts/gpu_check.sh
#
# Variables: PYTHON (default python3), IXI (folder with participants.csv; default $SLICE2VOL_IXI,
# else ../shared/data/ixi-hh-2mm), SUBJECTS (16), STRIDE (1), WORKERS (cores - 2, at least 1),
# ENCODERS (bench_encoders list), CACHE_ENCODER (timm/resnet18), QUICK=1 (one round, fewer slices).
#
# On a machine without internet whose Python lacks nibabel (the H200 image of this workplace has
# torch, timm, h5py, pandas, scikit-learn but not nibabel), carry wheels and a data subset and
# install them first; prepared here (repository root):
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/ixi/t1
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/whl nibabel
#   head -17 ../shared/data/ixi-hh-2mm/participants.csv | cut -d, -f1-4 > .gpu/ixi/participants.csv
#   for s in $(tail -n +2 .gpu/ixi/participants.csv | cut -d, -f1); do
#     cp ../shared/data/ixi-hh-2mm/t1/${s}_T1.nii.gz .gpu/ixi/t1/; done
# then run with carry [".gpu"] and the command
#   WHEELS=.gpu/whl IXI=.gpu/ixi OUT=$OUT bash scripts/gpu_check.sh
set -euo pipefail

PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu QUICK=1 only to smoke-test this script on a machine without a GPU
QUICK=${QUICK:-0}
IXI=${IXI:-${SLICE2VOL_IXI:-../shared/data/ixi-hh-2mm}}
SUBJECTS=${SUBJECTS:-16}
STRIDE=${STRIDE:-1}
CORES=$(nproc)
WORKERS=${WORKERS:-$(( CORES > 3 ? CORES - 2 : 1 ))}
ENCODERS=${ENCODERS:-"tv/mobilenet_v2 timm/resnet50 timm/vit_small_patch16_224"}
CACHE_ENCODER=${CACHE_ENCODER:-timm/resnet18}
CEILING=${CEILING:-$([[ "$DEVICE" == cpu ]] && echo 2048 || echo 8192)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${WHEELS:-}" ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-check-site \
    "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu-check-site"
fi

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$OUT/nvidia-smi.txt"
DEVICE="$DEVICE" "$PYTHON" - > "$OUT/env.txt" <<'EOF'
import os, sys, torch
cuda = os.environ["DEVICE"] != "cpu"
assert not cuda or torch.cuda.is_available(), "no CUDA device visible to torch"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(0) if cuda else "cpu", "cores", len(os.sched_getaffinity(0)))
import nibabel, h5py, timm  # what bench_cache needs: fail here, not after the encoder benchmark
print("nibabel", nibabel.__version__, "h5py", h5py.__version__, "timm", timm.__version__)
EOF
cat "$OUT/env.txt"

ROUNDS=2; REPEATS=20; NAIVE=300; REPS=3
if [[ "$QUICK" == 1 ]]; then ROUNDS=1; REPEATS=${REPEATS_QUICK:-10}; NAIVE=${NAIVE_QUICK:-100}; REPS=2
  SUBJECTS=$(( SUBJECTS < 8 ? SUBJECTS : 8 )); fi

# 1. bare forward, fp32 and bf16 autocast, batch size from the probe; the ceiling is the device's
#    matmul in the same dtype (fp32 with TF32 off, PyTorch's default; bf16), measured in the same run
for amp in fp32 bf16; do
  extra=(); [[ "$amp" == bf16 ]] && extra=(--amp bf16)
  "$PYTHON" scripts/bench_encoders.py --device "$DEVICE" --variants project --rounds "$ROUNDS" \
    --repeats "$REPEATS" --warmup 3 --batch-size auto --max-batch 512 --ceiling-size "$CEILING" \
    --encoders $ENCODERS ${extra[@]+"${extra[@]}"} \
    --json "$OUT/encoders_$amp.json" 2>&1 | tee "$OUT/encoders_$amp.log"
done

# 2. caching pipeline vs bare forward vs naive loop, bf16, workers reading volumes in parallel
"$PYTHON" scripts/bench_cache.py --device "$DEVICE" --amp bf16 --batch-size auto --encoder "$CACHE_ENCODER" \
  --ixi "$IXI" --subjects "$SUBJECTS" --stride "$STRIDE" --workers "$WORKERS" --reps "$REPS" --rss '' \
  --naive-slices "$NAIVE" --naive-warmup 20 --out "$OUT/cache_bf16.json" 2>&1 | tee "$OUT/cache_bf16.log"

{
  echo "# gpu_check.sh $(date -u +%FT%TZ): $(head -2 "$OUT/env.txt" | tr '\n' ' ')"
  grep -h "^|" "$OUT/encoders_fp32.log" "$OUT/encoders_bf16.log" || true
  grep -h "ceiling" "$OUT/encoders_fp32.log" "$OUT/encoders_bf16.log" || true
  grep -hE "^(timm|tv)/|pipeline / bare|pipeline [0-9]|ours / naive" "$OUT/cache_bf16.log" || true
} | tee "$OUT/summary.txt"
