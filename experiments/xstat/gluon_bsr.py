"""Hopper (sm_90) x-stationary kernel for y = act(x @ W^T + b) with W block-sparse (BSR), in Triton's Gluon dialect.

An experiment, not part of the package (formerly superblock/kernels/_gluon_bsr.py): correct, but slower than the
tiled kernel wherever it was measured (docs/kernel_notes.md, "The x-stationary Gluon kernel"; docs/benchmarks.md,
"Hopper x-stationary kernel"). experiments/xstat/runner.py runs it.

Why a second kernel: the tiled Triton kernel (superblock/kernels/_triton_bsr.py) runs one program per (token tile,
block row) and re-reads the token tile's x blocks for every kept block, from L2. At 16-32-wide blocks that is ~20
reads of x per layer (d * N / bh) and each MMA is a 16-wide sliver: it loses to dense (docs/kernel_notes.md).

Here one program owns a token tile of BLOCK_M tokens and the whole reduction dimension: it copies x[m0:m0+BM, :K]
into shared memory once (K / bw TMA boxes of [BM, bw], one mbarrier), then walks a run of block rows. For each
kept block it indexes the resident x box by the block's column at run time (`x_smem.index(col)`: what plain Triton
cannot express) and issues one warpgroup MMA (wgmma, HGMMA in SASS) against the block, which streams through a
STAGES-deep ring of TMA copies. At the end of a block row the accumulator gets bias and GELU and leaves through a
ring of up to 4 TMA stores in flight. So x is read from memory once per program, W (small: the kept blocks) from L2.

Limits: x's tile must fit in shared memory (BM * K * 2 bytes + the W ring + 2 y tiles <= ~220 KB: K <= 1536 at
BM=64), 16-bit dtypes, K and the row stride 16-byte aligned, K a multiple of bw (no padding columns to mask),
block sides 16..128. `usable()` says whether a problem qualifies (runner.run refuses the others with a clear error).

Config: BLOCK_M (64 | 128), num_warps (4 | 8), STAGES (the W ring), XS = number of row chunks the block rows are
split into (more programs when there are few token tiles; each chunk re-reads its x tile).
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAS_GLUON = True
except Exception:  # pragma: no cover - older Triton, or none
    HAS_GLUON = False

SMEM_BUDGET = 220 * 1024  # of the 227 KB a block may have on sm_90
_GL_DTYPES = {}
if HAS_GLUON:
    _GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


Y_BUFS = 4  # y tiles in flight to memory: a TMA store takes ~1-2 us to land, longer than a short block row


def smem_bytes(block_m: int, k_in: int, bh: int, bw: int, stages: int, elem: int = 2, y_bufs: int = Y_BUFS) -> int:
    """Shared memory one program takes: the resident x tile, the W ring, the y tiles in flight, the barriers."""
    return elem * (block_m * k_in + stages * bh * bw + y_bufs * block_m * bh) + 8 * (stages + 1)


def max_stages(block_m: int, k_in: int, bh: int, bw: int, budget: int = SMEM_BUDGET, cap: int = 64) -> int:
    """The deepest W ring (<= cap) that fits `budget` bytes beside x's tile and the y tiles; 0 if none of 2 fits.
    Pass half the budget for a ring that leaves room for a second program on the SM: on an H200 two programs with
    ~10 slots beat one with 64 (docs/kernel_notes.md)."""
    for stages in range(cap, 1, -1):
        if smem_bytes(block_m, k_in, bh, bw, stages) <= budget:
            return stages
    return 0


def y_buffers(block_m: int, k_in: int, bh: int, bw: int, stages: int) -> int:
    """How many y tiles fit beside x's tile and the W ring (2 to Y_BUFS)."""
    for n in range(Y_BUFS, 2, -1):
        if smem_bytes(block_m, k_in, bh, bw, stages, y_bufs=n) <= SMEM_BUDGET:
            return n
    return 2


def usable(x2d: torch.Tensor, values: torch.Tensor, n_out: int, block_m: int = 64, stages: int = 4) -> bool:
    """Whether the x-stationary kernel can run this problem (device, dtype, shapes, alignment, shared memory)."""
    if not HAS_GLUON or x2d.device.type != "cuda" or x2d.dtype not in _GL_DTYPES or values.dtype != x2d.dtype:
        return False
    if torch.cuda.get_device_capability(x2d.device)[0] != 9:
        return False
    k_in = x2d.shape[1]
    nnz, bh, bw = (int(v) for v in values.shape)
    if nnz == 0:  # a TMA descriptor needs a non-empty tensor; the tiled kernel writes bias / zeros
        return False
    if not (16 <= bh <= 128 and 16 <= bw <= 128) or k_in % bw or n_out % 8:
        return False
    if not tma_aligned(x2d) or values.data_ptr() % 16:
        return False
    return smem_bytes(block_m, k_in, bh, bw, stages, y_bufs=2) <= SMEM_BUDGET


def tma_aligned(t: torch.Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can address: contiguous rows, 16-byte aligned base and row stride."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


if HAS_GLUON:

    @gluon.jit
    def _xstat_kernel(
        x_desc,
        w_desc,
        y_desc,
        crow_ptr,
        col_ptr,
        b_ptr,
        N,
        n_rows,
        n_chunks,
        BM: gl.constexpr,
        BH: gl.constexpr,
        BW: gl.constexpr,
        KB: gl.constexpr,
        STAGES: gl.constexpr,
        LAG: gl.constexpr,
        YB: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        ACT: gl.constexpr,
        WARPS_M: gl.constexpr,
        WARPS_N: gl.constexpr,
        INSTR_N: gl.constexpr,
    ):
        dtype: gl.constexpr = x_desc.dtype
        pid = gl.program_id(0)
        pid_m = pid // n_chunks  # token-tile major: the chunks of one token tile run together
        pid_c = pid - pid_m * n_chunks
        m0 = pid_m * BM
        rows_per = gl.cdiv(n_rows, n_chunks)
        r0 = gl.minimum(pid_c * rows_per, n_rows)  # a chunk past the last row walks nothing
        r1 = gl.minimum(r0 + rows_per, n_rows)
        e0 = gl.load(crow_ptr + r0)
        e1 = gl.load(crow_ptr + r1)

        x_smem = gl.allocate_shared_memory(dtype, [KB, BM, BW], x_desc.layout)
        w_smem = gl.allocate_shared_memory(dtype, [STAGES, BH, BW], w_desc.layout)
        y_smem = gl.allocate_shared_memory(dtype, [YB, BM, BH], y_desc.layout)
        x_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        w_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(x_bar, count=1)
        for p in gl.static_range(STAGES):
            mbarrier.init(w_bar.index(p), count=1)

        # the token tile of x, once; TMA zero-fills rows past M
        mbarrier.expect(x_bar, KB * x_desc.block_type.nbytes)
        for kb in range(KB):
            tma.async_copy_global_to_shared(x_desc, [m0, kb * BW], x_bar, x_smem.index(kb))
        # the ring: block i of this chunk goes to slot i % STAGES; MMAs run up to LAG behind their issue, so the
        # slot of block i - LAG is refilled (with block i - LAG + STAGES) once MMA i is issued
        for p in gl.static_range(STAGES - LAG):
            ok = e0 + p < e1
            mbarrier.expect(w_bar.index(p), w_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(w_desc, [(e0 + p) * BH, 0], w_bar.index(p), w_smem.index(p), pred=ok)

        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS_M, WARPS_N], instr_shape=[16, INSTR_N, 16]
        )
        n_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        # the indices each MMA needs are loaded ahead (a global load's latency, ~500 cycles from L2, would otherwise
        # sit between consecutive MMAs, which take tens of cycles): the next 8 column indices, the next 2 row ends
        c0 = gl.load(col_ptr + e0, mask=e0 < e1, other=0)
        c1 = gl.load(col_ptr + e0 + 1, mask=e0 + 1 < e1, other=0)
        c2 = gl.load(col_ptr + e0 + 2, mask=e0 + 2 < e1, other=0)
        c3 = gl.load(col_ptr + e0 + 3, mask=e0 + 3 < e1, other=0)
        c4 = gl.load(col_ptr + e0 + 4, mask=e0 + 4 < e1, other=0)
        c5 = gl.load(col_ptr + e0 + 5, mask=e0 + 5 < e1, other=0)
        c6 = gl.load(col_ptr + e0 + 6, mask=e0 + 6 < e1, other=0)
        c7 = gl.load(col_ptr + e0 + 7, mask=e0 + 7 < e1, other=0)
        end1 = gl.load(crow_ptr + gl.minimum(r0 + 1, n_rows))
        end2 = gl.load(crow_ptr + gl.minimum(r0 + 2, n_rows))
        beg = e0
        mbarrier.wait(x_bar, 0)

        for r in range(r0, r1):
            e_end = end1
            end1 = end2
            end2 = gl.load(crow_ptr + gl.minimum(r + 3, n_rows))
            offs_n = r * BH + gl.arange(0, BH, layout=n_layout)
            if HAS_BIAS:
                bias = gl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
            acc = gl.zeros([BM, BH], gl.float32, layout=mma_layout)
            for e in range(beg, e_end):
                i = e - e0
                slot = i % STAGES
                c = c0
                c0 = c1
                c1 = c2
                c2 = c3
                c3 = c4
                c4 = c5
                c5 = c6
                c6 = c7
                c7 = gl.load(col_ptr + e + 8, mask=e + 8 < e1, other=0)
                mbarrier.wait(w_bar.index(slot), (i // STAGES) & 1)
                acc = warpgroup_mma(x_smem.index(c), w_smem.index(slot).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=LAG, deps=(acc,))
                j = i - LAG + STAGES
                sj = j % STAGES
                ok = e0 + j < e1
                mbarrier.expect(w_bar.index(sj), w_desc.block_type.nbytes, pred=ok)
                tma.async_copy_global_to_shared(w_desc, [(e0 + j) * BH, 0], w_bar.index(sj), w_smem.index(sj), pred=ok)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            beg = e_end

            if HAS_BIAS:
                acc = acc + gl.expand_dims(bias, 0)
            if ACT == 1:  # exact (erf) GELU, as nn.GELU()
                acc = 0.5 * acc * (1.0 + gl.erf(acc * 0.7071067811865476))
            yb = (r - r0) % YB
            tma.store_wait(pendings=YB - 1)  # the store that last used this y buffer has left it
            y_smem.index(yb).store(acc.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(y_desc, [m0, r * BH], y_smem.index(yb))

        # Triton 3.6's Gluon front end carries a variable through a loop only when it is read after the loop (else
        # every row would reuse the first row's bounds): these are read by a store that never fires (beg >= 0)
        gl.store(crow_ptr + r0, beg + end1 + end2 + c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7, mask=beg < 0)
        tma.store_wait(pendings=0)
        mbarrier.invalidate(x_bar)
        for p in gl.static_range(STAGES):
            mbarrier.invalidate(w_bar.index(p))


def _layout(shape: list[int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(shape, _GL_DTYPES[dtype])


def row_chunks(n_rows: int, requested: int) -> int:
    """How many row chunks the kernel runs for `requested` (config XS): at most one per block row, and none that
    would start past the last row (each chunk takes ceil(n_rows / requested) rows, so 66 asked of 72 rows is 36)."""
    chunks = max(1, min(requested, n_rows))
    return -(-n_rows // -(-n_rows // chunks)) if n_rows else 1


def warps_split(block_m: int, num_warps: int) -> tuple[int, int]:
    """(warps along M, warps along N) of the wgmma accumulator: 4-warp groups stacked along M while rows last."""
    wm = 4
    while wm < num_warps and block_m > 16 * wm:
        wm *= 2
    return wm, num_warps // wm


def launch(
    x2d: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    n_out: int,
    activation: str | None,
    config: dict,
) -> torch.Tensor:
    """Run the x-stationary kernel into y [M, n_out] (int32 crow/col, plain block rows). The caller checked
    `usable`; config has BLOCK_M, num_warps, num_stages (the W ring depth) and XS (row chunks)."""
    M, k_in = x2d.shape
    bh, bw = int(values.shape[1]), int(values.shape[2])
    block_m, warps = int(config["BLOCK_M"]), int(config["num_warps"])
    stages = max(2, int(config["num_stages"]))
    lag = min(int(config.get("LAG", 2)), stages - 1)
    n_rows = crow.numel() - 1
    chunks = row_chunks(n_rows, int(config.get("XS", 1)))
    dt = x2d.dtype
    x_desc = TensorDescriptor.from_tensor(x2d, [block_m, bw], _layout([block_m, bw], dt))
    w_desc = TensorDescriptor.from_tensor(values.view(-1, bw), [bh, bw], _layout([bh, bw], dt))
    y_desc = TensorDescriptor.from_tensor(y, [block_m, bh], _layout([block_m, bh], dt))
    wm, wn = warps_split(block_m, warps)
    instr_n = max(8, bh // wn)
    grid = (triton.cdiv(M, block_m) * chunks,)
    _xstat_kernel[grid](
        x_desc, w_desc, y_desc, crow, col, bias if bias is not None else y, n_out, n_rows, chunks,
        BM=block_m, BH=bh, BW=bw, KB=k_in // bw, STAGES=stages, LAG=lag,
        YB=y_buffers(block_m, k_in, bh, bw, stages), HAS_BIAS=bias is not None,
        ACT=1 if activation == "gelu" else 0, WARPS_M=wm, WARPS_N=wn, INSTR_N=instr_n, num_warps=warps,
    )  # fmt: skip
    return y
