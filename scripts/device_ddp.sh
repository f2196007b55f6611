#!/usr/bin/env bash
# Device run (2 GPUs): DDP throughput on 1 vs 2 GPUs through train.py, GPU tests, export baseline.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
COMMON="model=vit_b_16 data.image_size=224 data.train_size=4096 data.val_size=256 data.batch_size=128 \
data.num_workers=0 sparsity.level=0.9 sparsity.block_size=32 trainer.max_epochs=2 trainer.log_every_steps=8"
for n in 1 2; do
  torchrun --standalone --nproc_per_node=$n train.py $COMMON hydra.run.dir=$OUT/ddp$n > $OUT/ddp$n.log 2>&1
  echo "ddp$n rc=$?"; tail -3 $OUT/ddp$n.log
done
python3 - <<'PY'
import json, os
for n in (1, 2):
    p = os.path.join(os.environ["OUT"], f"ddp{n}", "summary.json")
    if os.path.exists(p):
        s = json.load(open(p))
        print(f"| {n} | {s['images_per_s']:.0f} | {s['steps']} | {s['masks_equal_across_ranks']} | {s['val_top1']:.1f} |")
PY
python3 -m pytest -q -m gpu tests/gpu/test_sparsity_gpu.py tests/gpu/test_export_gpu.py -p no:cacheprovider -x 2>&1 | tail -15
timeout 240 python3 benchmarks/bsr_baseline.py --json $OUT/baseline.json > $OUT/baseline.log 2>&1; tail -14 $OUT/baseline.log
