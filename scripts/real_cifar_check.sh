#!/usr/bin/env bash
# Small-budget real-data checks on the CIFAR-10 JPEG image folder (../shared/data, see docs/benchmarks.md), sized for a CPU.
#   tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/data
#   bash scripts/real_cifar_check.sh /tmp/data/cifar10-jpeg [OUT_DIR] [baseline|distill|all]
# Prints one JSON line per finished run (from each run's metrics.json).
set -euo pipefail
ROOT=${1:?usage: real_cifar_check.sh CIFAR10_JPEG_ROOT [OUT_DIR] [baseline|distill|all]}
OUT=${2:-logs/real_cifar}
PART=${3:-all}
# Budget of the distillation check (override through the environment).
SUBSET=${SUBSET:-10000}         # fixed random training subset
TEACHER_EPOCHS=${TEACHER_EPOCHS:-4}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-3}
VAL_IMAGES=${VAL_IMAGES:-2048}   # random test images for the end-of-run validation; the test uses all 10,000
SEED=${SEED:-0}
COMMON=(data=image_folder "data.root=$ROOT" data.name=cifar10_jpeg data.num_workers=2 logger=csv
        "paths.log_dir=$OUT" "paths.checkpoint_dir=$OUT/checkpoints" seed=$SEED)

if [[ $PART == baseline || $PART == all ]]; then
  # The student alone: 4 epochs of 80 batches (issue: > 45 % test accuracy on all 10,000 test images).
  python train.py stage=baseline student=wrn16_2 "${COMMON[@]}" task_name=baseline_4x80 \
      trainer.max_epochs=4 trainer.limit_train_batches=80
fi

if [[ $PART == distill || $PART == all ]]; then
  # Cosine lr to 0 over the run: a short run then ends annealed instead of at lr 0.1, whose
  # last-epoch accuracy swings by several points from run to run.
  BUDGET=(data.train_subset=$SUBSET optim=sgd_cosine data.val_subset=$VAL_IMAGES)
  # A WRN-40-2 teacher on the fixed subset.
  python train.py stage=teacher teacher=wrn40_2 "${COMMON[@]}" "${BUDGET[@]}" task_name=teacher_real \
      trainer.max_epochs=$TEACHER_EPOCHS trainer.check_val_every_n_epoch=$TEACHER_EPOCHS
  # WRN-16-2 students, same seed and subset, Hinton KD with and without the Grad-CAM++ loss.
  for EXPLAIN in none gradcampp; do
    python train.py teacher=wrn40_2 student=wrn16_2 kd=hinton "explain=$EXPLAIN" "${COMMON[@]}" "${BUDGET[@]}" \
        task_name=distill_real trainer.max_epochs=$STUDENT_EPOCHS trainer.check_val_every_n_epoch=$STUDENT_EPOCHS
  done
fi

for f in $(find "$OUT" -name metrics.json | sort); do
  python -c "import json,sys; r=json.load(open(sys.argv[1])); m=r['metrics']; \
print(json.dumps({'run': sys.argv[1], 'stage': r['stage'], 'explain': r['config']['explain']['name'], \
'kd': r['config']['kd']['name'], **{k: round(v, 4) for k, v in m.items() if k.startswith('test/')}}))" "$f"
done
