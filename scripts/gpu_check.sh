#!/usr/bin/env bash
# The GPU check, in under 8 minutes on one GPU: what an explanation loss costs per training step, and a
# short real CIFAR-10 table. Its output is recorded, with the date and the device, in docs/speed.md.
#
#   bash scripts/gpu_check.sh CIFAR10_JPEG_ROOT [OUT_DIR]
#   DRY=1 bash scripts/gpu_check.sh ROOT OUT      # a tiny CPU version of every step (tests/test_gpu_check.py)
#
# 1. bench_step.py, WRN-40-2 -> WRN-16-2 at batch 128 in bf16: explain/KD step time and memory ratios and
#    the images/s of each step;
# 2. the same for a 224-pixel pool-first pair (torchvision ResNet-34 -> ResNet-18, batch 64);
# 3. real CIFAR-10 (the image folder, uint8 on the GPU): a WRN-40-2 teacher for a few epochs, then
#    WRN-16-2 students with KD and with KD + Grad-CAM++ (the paper's loss), same seed; one line each.
set -euo pipefail
ROOT=${1:?usage: gpu_check.sh CIFAR10_JPEG_ROOT [OUT_DIR]}
OUT=${2:-logs/gpu_check}
cd "$(dirname "$0")/.."

if [[ ${DRY:-0} == 1 ]]; then  # every command once, tiny, on the CPU
  BENCH=(--device cpu --precision 32 --steps 1 --warmup 1)
  WRN_BATCH=4; POOL_BATCH=2; POOL_SIZE=64
  RUN=(trainer=cpu trainer.limit_train_batches=2 trainer.limit_val_batches=1 trainer.limit_test_batches=1
       trainer.num_sanity_val_steps=0 data.batch_size=8 data.num_workers=0)
  TEACHER_EPOCHS=1; STUDENT_EPOCHS=1
else
  BENCH=(--device cuda --precision bf16 --steps 20 --warmup 5)
  WRN_BATCH=128; POOL_BATCH=64; POOL_SIZE=224
  RUN=(trainer=gpu data.on_device=true trainer.enable_progress_bar=false)
  TEACHER_EPOCHS=${TEACHER_EPOCHS:-15}; STUDENT_EPOCHS=${STUDENT_EPOCHS:-15}
fi

echo "== device: $(date -u +%Y-%m-%dT%H:%MZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"

echo "== 1. step cost: WRN-40-2 -> WRN-16-2, batch $WRN_BATCH, 32 px"
python scripts/bench_step.py --batch-size "$WRN_BATCH" "${BENCH[@]}"

echo "== 2. step cost: torchvision resnet34 -> resnet18 (pool-first heads), batch $POOL_BATCH, $POOL_SIZE px"
python scripts/bench_step.py --teacher torchvision:resnet34 --student torchvision:resnet18 \
    --image-size "$POOL_SIZE" --batch-size "$POOL_BATCH" "${BENCH[@]}"

echo "== 3. real CIFAR-10: teacher $TEACHER_EPOCHS epochs, students $STUDENT_EPOCHS epochs (cosine lr, seed 0)"
COMMON=(data=image_folder "data.root=$ROOT" data.name=cifar10_jpeg logger=csv optim=sgd_cosine seed=0 "teacher.checkpoint=$OUT/teacher.ckpt"
        "paths.log_dir=$OUT" "paths.checkpoint_dir=$OUT/checkpoints" "${RUN[@]}")
start=$SECONDS
python train.py stage=teacher teacher=wrn40_2 "${COMMON[@]}" task_name=teacher trainer.max_epochs="$TEACHER_EPOCHS"
echo "teacher: $((SECONDS - start)) s"
for EXPLAIN in none gradcampp; do
  start=$SECONDS
  python train.py teacher=wrn40_2 student=wrn16_2 kd=hinton "explain=$EXPLAIN" "${COMMON[@]}" \
      task_name="student_$EXPLAIN" trainer.max_epochs="$STUDENT_EPOCHS"
  echo "student kd + explain=$EXPLAIN: $((SECONDS - start)) s"
done

echo "== table (test split, final weights)"
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

print(f"{'run':32s} {'test acc %':>10s} {'agreement %':>12s} {'map cosine':>11s}")
for path in sorted(Path(sys.argv[1]).rglob("metrics.json")):
    r = json.loads(path.read_text())
    m, c = r["metrics"], r["config"]
    name = r["stage"] if r["stage"] == "teacher" else f"student kd={c['kd']['name']} explain={c['explain']['name']}"
    cells = [f"{100 * m[k]:.2f}" if k in m else "-" for k in ("test/acc", "test/agreement")]
    cosine = f"{m['test/map_cosine']:.4f}" if "test/map_cosine" in m else "-"
    print(f"{name:32s} {cells[0]:>10s} {cells[1]:>12s} {cosine:>11s}")
EOF
