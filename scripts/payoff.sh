#!/usr/bin/env bash
# When explaining pays off (docs/payoff.md): few-shot and shortcut distillation on the real CIFAR-10 images,
# 3 seeds, rows CE | KD | KD + Grad-CAM++ (the paper's loss) | e2KD | CAT-KD.
#
#   bash scripts/payoff.sh CIFAR10_JPEG_ROOT [OUT_DIR]          # a 2-core CPU: ~2 h of students
#   DEVICE=gpu bash scripts/payoff.sh ROOT OUT                   # one GPU: both tables side by side, minutes
#   DRY=1 bash scripts/payoff.sh ROOT OUT                        # every command once, tiny (tests/test_payoff.py)
#
# On a GPU every row runs at once (the GPU is far from full with one small run).
# 1. One WRN-40-2 teacher on the full, clean training set (its time is printed), shared by every row and
#    seed of both tables (teacher.checkpoint=OUT/teacher.ckpt).
# 2. Few-shot: WRN-16-2 students distil on 50 images per class (data.per_class=50, the same 500 images for
#    every row and seed: data.subset_seed=0).
# 3. Shortcut: students distil on 200 images per class of which 90 % carry a square whose colour is their
#    class's (experiment=shortcut); the test runs clean and with a conflicting cue.
# Each table ends as OUT/<table>/summary.{md,csv,tex,png}: mean +- std over seeds of every test metric, of the
# final weights and of the best checkpoint.
set -euo pipefail
ROOT=${1:?usage: payoff.sh CIFAR10_JPEG_ROOT [OUT_DIR]}
OUT=${2:-logs/payoff}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
SEEDS=${SEEDS:-0,1,2}

if [[ ${DRY:-0} == 1 ]]; then
  RUN=(trainer=cpu data.batch_size=8 data.num_workers=0 trainer.limit_train_batches=2 trainer.limit_val_batches=1
       trainer.limit_test_batches=1 trainer.num_sanity_val_steps=0)
  TEACHER=(trainer.max_epochs=1); FEW=(trainer.max_epochs=1 data.per_class=2); SHORT=(trainer.max_epochs=1 data.per_class=2)
  SEEDS=${SEEDS_DRY:-0,1}
elif [[ ${DEVICE:-cpu} == gpu ]]; then
  RUN=(trainer=gpu data.on_device=true trainer.enable_progress_bar=false)
  TEACHER=(trainer.max_epochs=${TEACHER_EPOCHS:-30})
  FEW=(trainer.max_epochs=${FEW_EPOCHS:-200} trainer.check_val_every_n_epoch=10 data.batch_size=64)
  SHORT=(trainer.max_epochs=${SHORT_EPOCHS:-60} trainer.check_val_every_n_epoch=5 data.per_class=200)
else
  RUN=(trainer=cpu data.num_workers=1 trainer.enable_progress_bar=false data.val_subset=1000)
  TEACHER=(trainer.max_epochs=${TEACHER_EPOCHS:-4})
  FEW=(trainer.max_epochs=${FEW_EPOCHS:-60} trainer.check_val_every_n_epoch=10 data.batch_size=64)
  SHORT=(trainer.max_epochs=${SHORT_EPOCHS:-20} trainer.check_val_every_n_epoch=5 data.per_class=200)
fi
# lr 0.05 for every row (RepDistiller's; CAT-KD at its weight diverges at 0.1 on short runs)
COMMON=(data=image_folder "data.root=$ROOT" data.name=cifar10_jpeg logger=csv optim=sgd_cosine optim.optimizer.lr=0.05
        teacher=wrn40_2 "teacher.checkpoint=$OUT/teacher.ckpt" "paths.log_dir=$OUT/logs" "${RUN[@]}")
ROWS=("kd=none explain=none" "kd=hinton explain=none" "kd=hinton explain=gradcampp" "kd=none explain=e2kd"
      "kd=cat explain=none")

if [[ ! -f $OUT/teacher.ckpt ]]; then
  start=$SECONDS
  python train.py stage=teacher "${COMMON[@]}" "${TEACHER[@]}" task_name=payoff_teacher seed=0
  echo "teacher: $((SECONDS - start)) s" | tee "$OUT/teacher_time.txt"
fi

table() {  # table NAME EXPERIMENT OPTIONS...: every row, every seed, into OUT/NAME; then its summary
  local name=$1 experiment=$2; shift 2
  local pids=()
  for row in "${ROWS[@]}"; do
    # shellcheck disable=SC2086  # a row is several overrides
    python train.py -m "experiment=$experiment" "${COMMON[@]}" "$@" student=wrn16_2 $row "seed=$SEEDS" \
        "task_name=$name" "hydra.sweep.dir=$OUT/$name" "hydra.sweep.subdir=\${kd.name}-\${explain.name}-\${seed}" \
        > "$OUT/$name-${row// /_}.log" 2>&1 &
    pids+=($!)
    [[ ${DEVICE:-cpu} == gpu ]] || wait "${pids[-1]}" || { echo "failed: $name $row"; exit 1; }  # a CPU: one at a time
  done
  for pid in "${pids[@]}"; do wait "$pid" || { echo "failed: a row of $name (logs: $OUT/$name-*.log)"; exit 1; }; done
  python scripts/summarize.py "$OUT/$name" > /dev/null
  echo "== $name: $OUT/$name/summary.md"
  sed -n '/^| variant/,/^$/p' "$OUT/$name/summary.md"
}

start=$SECONDS
if [[ ${DEVICE:-cpu} == gpu ]]; then  # the GPU is far from full with one small run: both tables at once
  table few_shot few_shot "${FEW[@]}" > "$OUT/few_shot.txt" 2>&1 & few=$!
  table shortcut shortcut "${SHORT[@]}" > "$OUT/shortcut.txt" 2>&1 & short=$!
  status=0; wait $few || status=1; wait $short || status=1
  cat "$OUT/few_shot.txt" "$OUT/shortcut.txt"
  [[ $status == 0 ]] || exit 1
else
  table few_shot few_shot "${FEW[@]}"
  table shortcut shortcut "${SHORT[@]}"
fi
echo "students: $((SECONDS - start)) s"
