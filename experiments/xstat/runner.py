"""Running the x-stationary Gluon kernel (gluon_bsr.py) on a BSR weight, and the launch configurations worth trying.

What used to live in the package (superblock.kernels._runners._run_xstat, superblock.kernels.tuning.xstat_configs)
before the kernel left it. A config is a dict with BLOCK_M (64 | 128), num_warps, num_stages (the W ring's depth)
and XS (the number of row chunks the block rows are split into); G and SPLIT, the tiled and decode kernels' keys,
must be 1 and absent.

    y = run(x2d, values, crow, col, bias, out_f, "gelu", configs(x2d, values, out_f)[0])
"""

from __future__ import annotations

import torch

from experiments.xstat import gluon_bsr

ACTIVATIONS = (None, "gelu")


def run(
    x2d: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    bias: torch.Tensor | None,
    out_f: int,
    activation: str | None,
    config: dict,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x2d @ W^T + bias) into y [M, out_f] (allocated when None) by the x-stationary kernel, for the BSR weight
    (values [nnz, bh, bw], crow, col; int64 indices are converted to int32), or a clear ValueError where it cannot
    run (an sm_90 GPU, bf16/fp16, K a multiple of the block width, 16-byte aligned rows, x's tile in shared
    memory)."""
    in_f = x2d.shape[1]
    if x2d.stride(-1) != 1 or (x2d.shape[0] > 1 and x2d.stride(0) < in_f):
        x2d = x2d.contiguous()
    if not values.is_contiguous():
        values = values.contiguous()
    if y is None:
        y = torch.empty(x2d.shape[0], out_f, device=x2d.device, dtype=x2d.dtype)
    elif tuple(y.shape) != (x2d.shape[0], out_f) or y.dtype != x2d.dtype:
        raise ValueError(f"y must be {x2d.dtype} [{x2d.shape[0]}, {out_f}], got {y.dtype} {list(y.shape)}")
    if x2d.shape[0] == 0:
        return y
    _check(x2d, values, out_f, activation, config, y)
    if crow.dtype != torch.int32 or col.dtype != torch.int32:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    return gluon_bsr.launch(x2d, values, crow, col, bias, y, out_f, activation, config)


def _check(x2d, values, out_f, activation, config, y) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"the x-stationary kernel takes activation None or 'gelu', not {activation!r} (for 'silu_mul' use "
            "superblock's tiled or decode kernel)"
        )
    block_m, stages = int(config["BLOCK_M"]), int(config["num_stages"])
    if int(config.get("G", 1)) != 1 or int(config.get("SPLIT", 0)):
        raise ValueError("the x-stationary kernel (XS >= 1) walks plain block rows: it needs G == 1 and no SPLIT")
    if not (gluon_bsr.usable(x2d, values, out_f, block_m, stages) and gluon_bsr.tma_aligned(y)):
        raise ValueError(
            "the x-stationary kernel (XS >= 1) needs an sm_90 GPU, bf16/fp16, K a multiple of the block width, "
            f"16-byte aligned rows and x's tile in shared memory; not {tuple(x2d.shape)} x {tuple(values.shape)} "
            f"{x2d.dtype} with BLOCK_M={block_m}"
        )


def _config(block_m: int, stages: int, chunks: int) -> dict:
    return {"BLOCK_M": block_m, "G": 1, "num_warps": 4, "num_stages": stages, "TMA": False, "XS": chunks}


def configs(x2d: torch.Tensor, values: torch.Tensor, n_out: int) -> list[dict]:
    """Configurations of the x-stationary kernel for this problem: each shape with enough row chunks (XS) that the
    programs fill every SM twice over, since a program's MMAs are small and its latency wants company. Empty where
    the kernel cannot run (off the GPU among them)."""
    if x2d.device.type != "cuda" or x2d.shape[0] == 0:
        return []
    sms = torch.cuda.get_device_properties(x2d.device).multi_processor_count
    k_in, bh, bw = x2d.shape[1], int(values.shape[1]), int(values.shape[2])
    n_rows = -(-n_out // bh)
    # the shapes that measured fastest (docs/kernel_notes.md): a tile of 64 tokens with a W ring small enough for two
    # programs per SM (two chains of MMAs), else with 8 slots, and a tile of 128 with the ring that fits beside it;
    # a 64-token tile with the deepest ring (one program per SM) was slowest of all
    two_per_sm = gluon_bsr.max_stages(64, k_in, bh, bw, budget=gluon_bsr.SMEM_BUDGET // 2, cap=32)
    shapes = [
        (64, two_per_sm if two_per_sm >= 4 else gluon_bsr.max_stages(64, k_in, bh, bw, cap=8)),
        (128, gluon_bsr.max_stages(128, k_in, bh, bw, cap=24)),
    ]
    out = []
    for block_m, stages in dict.fromkeys(shapes):
        if stages < 4 or not gluon_bsr.usable(x2d, values, n_out, block_m, stages):
            continue
        smem = gluon_bsr.smem_bytes(block_m, k_in, bh, bw, stages)
        per_sm = max(1, gluon_bsr.SMEM_BUDGET // smem)
        tiles = -(-x2d.shape[0] // block_m)
        chunks = max(1, min(n_rows, -(-2 * sms * per_sm // tiles)))
        out.append(_config(block_m, stages, chunks))
    return out
