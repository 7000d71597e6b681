#!/usr/bin/env bash
# Small-budget real-data checks on the CIFAR-10 JPEG image folder (SPEC §6), CPU friendly.
#   tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/data
#   bash scripts/real_cifar_check.sh /tmp/data/cifar10-jpeg [OUT_DIR]
# Prints one JSON line per run (from each run's metrics.json).
set -euo pipefail
ROOT=${1:?usage: real_cifar_check.sh CIFAR10_JPEG_ROOT [OUT_DIR]}
OUT=${2:-logs/real_cifar}
COMMON=(data=image_folder "data.root=$ROOT" data.name=cifar10_jpeg data.num_workers=2 logger=csv
        "paths.log_dir=$OUT" "paths.checkpoint_dir=$OUT/checkpoints" seed=0)

# 1. The student alone: 4 epochs of 80 batches (issue: > 45 % test accuracy).
python train.py stage=baseline student=wrn16_2 "${COMMON[@]}" task_name=baseline_4x80 \
    trainer.max_epochs=4 trainer.limit_train_batches=80

# 2. A WRN-40-2 teacher: 4 epochs on a fixed 10,000-image subset.
python train.py stage=teacher teacher=wrn40_2 "${COMMON[@]}" task_name=teacher_10k \
    data.train_subset=10000 trainer.max_epochs=4 trainer.check_val_every_n_epoch=4

# 3. WRN-16-2 students, 3 epochs each, same seed and subset, KD with and without Grad-CAM++.
for EXPLAIN in none gradcampp; do
  python train.py teacher=wrn40_2 student=wrn16_2 kd=hinton "explain=$EXPLAIN" "${COMMON[@]}" \
      task_name=distill_10k data.train_subset=10000 trainer.max_epochs=3 trainer.check_val_every_n_epoch=3
done

for f in $(find "$OUT" -name metrics.json | sort); do
  python -c "import json,sys; r=json.load(open(sys.argv[1])); m=r['metrics']; \
print(json.dumps({'run': sys.argv[1], 'stage': r['stage'], 'explain': r['config']['explain']['name'], \
'kd': r['config']['kd']['name'], **{k: round(v, 4) for k, v in m.items() if k.startswith('test/')}}))" "$f"
done
