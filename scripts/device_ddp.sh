#!/usr/bin/env bash
# Device run on nvidia-h200-x2: DDP throughput on 1 vs 2 GPUs through train.py, then the GPU tests of the
# sparsity core and export. Usage (device tool): bash scripts/device_ddp.sh   (logs under $OUT)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
COMMON="model=vit_b_16 data.image_size=224 data.train_size=8192 data.val_size=256 data.batch_size=128 \
data.num_workers=6 sparsity.level=0.9 sparsity.block_size=32 trainer.max_epochs=2 trainer.log_every_steps=8"
for n in 1 2; do
  torchrun --standalone --nproc_per_node=$n train.py $COMMON hydra.run.dir=$OUT/ddp$n > $OUT/ddp$n.log 2>&1
  echo "ddp$n rc=$?"; tail -2 $OUT/ddp$n.log
done
python3 - <<'PY'
import json, os
print("| GPUs | images/s (steady) | optimizer steps | masks equal on all ranks | val top-1 |")
for n in (1, 2):
    p = os.path.join(os.environ["OUT"], f"ddp{n}", "summary.json")
    if os.path.exists(p):
        s = json.load(open(p))
        print(f"| {n} | {s['images_per_s']:.0f} | {s['steps']} | {s['masks_equal_across_ranks']} | {s['val_top1']:.1f} |")
PY
python3 -m pytest -q -m gpu tests/gpu/test_sparsity_gpu.py tests/gpu/test_export_gpu.py -p no:cacheprovider 2>&1 | tail -4
python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py -k "graph_target" -p no:cacheprovider 2>&1 | tail -2
