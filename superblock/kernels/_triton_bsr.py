"""Triton kernel for y = act(x @ W^T + b) with W block-sparse (BSR), tuned for Hopper.

Work split: one program computes a (BLOCK_M tokens) x (G * bh outputs) tile of y. Programs are numbered
token-tile major, output-group minor, so all programs that read the same token tile of x run at the same
time and the tile is read from DRAM once and then from L2. With G > 1 a program covers G consecutive block
rows: it walks the union of their column blocks, loads each x tile once and multiplies it by a (G*bh, bw)
weight tile gathered from the G rows (rows without that block read as zeros), so the MMA N-dimension is
G*bh even when bh is 16 or 32. The union layout is built once on the host (`grouped_layout`).

The problem is memory bound at ViT sizes and 80-95% sparsity (each output is written once, each input read
once from DRAM; the MMA work is 5-20% of dense), see docs/kernel_notes.md.

Activation "silu_mul" (code 2) is a gated MLP's gate and up projections in one product: the weight is [gate; up]
(2 * n_rows block rows, n_rows = N / bh, the up rows starting at block row n_rows) and y = silu(x @ Wg^T + bg) *
(x @ Wu^T + bu) has N columns. The program of output row group r walks gate group r and up group r + n_groups
into two accumulators (x tiles of columns both keep are read twice, from L2), so neither half is ever written out.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import torch

from superblock.kernels import _launch
from superblock.kernels._launch import specialization

try:  # Triton ships with torch on Linux; the package stays importable without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    triton = None
    tl = None
    HAS_TRITON = False

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older Triton
    TensorDescriptor = None

ACT_CODES = {None: 0, "gelu": 1, "silu_mul": 2}
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PRECISIONS = ("ieee", "tf32", "tf32x3")
WORK_WIDTH = 8  # int32 entries of one balanced decode program (balanced_work)

if HAS_TRITON:
    GLU = tl.constexpr(ACT_CODES["silu_mul"])  # two accumulators (gate, up) per program
    WORK = tl.constexpr(WORK_WIDTH)

    @triton.jit
    def _bsr_linear_kernel(
        x_ptr,
        w_ptr,
        crow_ptr,
        col_ptr,
        gidx_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_ym,
        stride_yn,
        n_groups,
        BH: tl.constexpr,
        BW: tl.constexpr,
        G: tl.constexpr,
        KB: tl.constexpr,
        BLOCK_M: tl.constexpr,
        EVEN_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        BN: tl.constexpr = G * BH
        pid = tl.program_id(0)
        # token-tile major: the n_groups programs sharing one x tile are adjacent in launch order
        pid_m = pid // n_groups
        pid_n = pid - pid_m * n_groups

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BN)
        m_mask = offs_m < M
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        acc = _tiled_row(acc, x_rows, stride_xk, w_ptr, col_ptr, gidx_ptr, crow_ptr + pid_n, m_mask, K, BH, BW, G, KB,
                         EVEN_K, PRECISION, UPCAST)  # fmt: skip
        if ACT == GLU:  # the up rows' groups follow the gate rows' (n_groups of each)
            up = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
            up = _tiled_row(up, x_rows, stride_xk, w_ptr, col_ptr, gidx_ptr, crow_ptr + n_groups + pid_n, m_mask, K,
                            BH, BW, G, KB, EVEN_K, PRECISION, UPCAST)  # fmt: skip
            _epilogue_glu(acc, up, b_ptr, y_ptr, offs_m, m_mask, pid_n * BN + offs_n, N, stride_ym, stride_yn,
                          HAS_BIAS)  # fmt: skip
        else:
            _epilogue(acc, b_ptr, y_ptr, offs_m, m_mask, pid_n * BN + offs_n, N, stride_ym, stride_yn, HAS_BIAS, ACT)

    @triton.jit
    def _mma(acc, a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # acc += a @ b^T in the requested fp32 precision ("none": the inputs' own, 16-bit on tensor cores)
        if PRECISION == "none":
            if UPCAST:  # Triton's CPU interpreter computes 16-bit dots wrongly (3.9); upcast there
                acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _tiled_row(acc, x_rows, stride_xk, w_ptr, col_ptr, gidx_ptr, row_ptr, m_mask, K, BH: tl.constexpr,
                   BW: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):  # fmt: skip
        # acc += the (BLOCK_M, G*BH) tile of x @ W^T of one (grouped) block row, whose row pointer is at row_ptr;
        # x_rows: [BLOCK_M, 1] pointers to the program's rows of x, whose columns are stride_xk apart (1: x is
        # token-major; the token count: x is feature-major, and a thin tile's BW columns are BW contiguous runs)
        if KB > 1:
            start = tl.load(row_ptr).to(tl.int64)
            end = tl.load(row_ptr + 1).to(tl.int64)
            return _packed_row(acc, x_rows, stride_xk, w_ptr, col_ptr, start, end, KB, m_mask, K, BH, BW, KB, EVEN_K,
                               PRECISION, UPCAST)  # fmt: skip
        BN: tl.constexpr = G * BH
        offs_k = tl.arange(0, BW)
        offs_n = tl.arange(0, BN)
        x_base = x_rows + offs_k.to(tl.int64)[None, :] * stride_xk  # 64-bit: a feature-major x's k * M
        if G == 1:
            w_base = w_ptr + offs_n[:, None] * BW + offs_k[None, :]
        else:
            w_inner = (offs_n % BH)[:, None] * BW + offs_k[None, :]
            sub = offs_n // BH
        # int64 loop bounds: the loop index scales into `values` (nnz * bh * bw may pass 2**31)
        start = tl.load(row_ptr).to(tl.int64)
        end = tl.load(row_ptr + 1).to(tl.int64)
        for e in range(start, end):
            c = tl.load(col_ptr + e)
            k0 = c * BW
            if EVEN_K:
                a = tl.load(x_base + k0.to(tl.int64) * stride_xk, mask=m_mask[:, None], other=0.0)
            else:
                k_mask = (k0 + offs_k) < K
                a = tl.load(x_base + k0.to(tl.int64) * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if G == 1:
                b = tl.load(w_base + e * (BH * BW))
            else:
                idx = tl.load(gidx_ptr + e * G + sub)
                b = tl.load(
                    w_ptr + idx.to(tl.int64)[:, None] * (BH * BW) + w_inner,
                    mask=(idx >= 0)[:, None],
                    other=0.0,
                )
            if not EVEN_K:
                # padding columns of W must not leak (a NaN there times a zero x is still NaN)
                b = tl.where(k_mask[None, :], b, tl.zeros_like(b))
            acc = _mma(acc, a, b, PRECISION, UPCAST)
        return acc

    @triton.jit
    def _packed_row(acc, x_rows, stride_xk, w_ptr, col_ptr, first, end, step, m_mask, K, BH: tl.constexpr,
                    BW: tl.constexpr, KB: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):  # fmt: skip
        # KB kept blocks of one block row per step: their x tiles side by side as one (BLOCK_M, KB*BW) tile and
        # their weight blocks as one (BH, KB*BW) tile, so a thin block (BW 16 or 32) still gives the MMA KB*BW
        # inputs per step and the loop a KB-th of the trips. Steps start at kept block `first` (an index into
        # values) and move by `step` up to the row's end `end` (the tiled kernel: the row's start and KB; the
        # decode kernel's program s: start + s*KB and split*KB). Slots past the row's end read as zeros.
        KW: tl.constexpr = KB * BW
        slot = tl.arange(0, KW) // BW  # which of the KB blocks each packed column belongs to
        inner = tl.arange(0, KW) % BW  # and its column inside that block
        offs_n = tl.arange(0, BH)
        for e0 in range(first, end, step):
            e = e0 + slot
            live = e < end
            c = tl.load(col_ptr + e, mask=live, other=0)
            k = c * BW + inner
            a_mask = m_mask[:, None] & live[None, :]
            if not EVEN_K:
                live = live & (k < K)
                a_mask = a_mask & (k < K)[None, :]
            a = tl.load(x_rows + k.to(tl.int64)[None, :] * stride_xk, mask=a_mask, other=0.0)
            b = tl.load(w_ptr + e[None, :] * (BH * BW) + offs_n[:, None] * BW + inner[None, :], mask=live[None, :],
                        other=0.0)  # fmt: skip
            acc = _mma(acc, a, b, PRECISION, UPCAST)
        return acc

    @triton.jit
    def _bsr_linear_tma_kernel(
        x_desc,
        w_desc,
        crow_ptr,
        col_ptr,
        b_ptr,
        y_desc,
        N,
        n_groups,
        BH: tl.constexpr,
        BW: tl.constexpr,
        BLOCK_M: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
        X_T: tl.constexpr = False,
        Y_T: tl.constexpr = False,
    ):
        # Same schedule as _bsr_linear_kernel with G == 1, but tiles move through the TMA engine
        # (descriptors zero-fill out-of-range reads and clip out-of-range writes). X_T / Y_T: x / y feature-major,
        # their descriptors over x^T [K, M] / y^T [N, M], boxes [BW, BLOCK_M] / [BH, BLOCK_M] (rows of BLOCK_M
        # tokens: a thin tile's box is BW long rows, not BLOCK_M rows of BW elements).
        pid = tl.program_id(0)
        pid_m = pid // n_groups
        pid_n = pid - pid_m * n_groups
        m0 = pid_m * BLOCK_M
        start = tl.load(crow_ptr + pid_n)
        end = tl.load(crow_ptr + pid_n + 1)
        acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
        for e in range(start, end):
            c = tl.load(col_ptr + e)
            if X_T:  # noqa: SIM108 - a constexpr branch: one of the two is compiled
                a = tl.trans(x_desc.load([c * BW, m0]))
            else:
                a = x_desc.load([m0, c * BW])
            b = w_desc.load([e * BH, 0])
            if PRECISION == "none":
                if UPCAST:  # Triton's CPU interpreter computes 16-bit dots wrongly (3.9); upcast there
                    acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, tl.trans(b), acc)
            else:
                acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        if HAS_BIAS:
            n_glob = pid_n * BH + tl.arange(0, BH)
            bias = tl.load(b_ptr + n_glob, mask=n_glob < N, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        if ACT == 1:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        if Y_T:
            y_desc.store([pid_n * BH, m0], tl.trans(acc.to(y_desc.dtype)))
        else:
            y_desc.store([m0, pid_n * BH], acc.to(y_desc.dtype))

    @triton.jit
    def _epilogue(acc, b_ptr, y_ptr, offs_m, m_mask, n_glob, N, stride_ym, stride_yn, HAS_BIAS: tl.constexpr,
                  ACT: tl.constexpr):  # fmt: skip
        # bias, activation and the masked store of y: shared by the tiled and the decode kernels
        n_mask = n_glob < N
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + n_glob, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:  # exact (erf) GELU, as nn.GELU()
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + n_glob.to(tl.int64)[None, :] * stride_yn
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _epilogue_glu(gate, up, b_ptr, y_ptr, offs_m, m_mask, n_glob, N, stride_ym, stride_yn,
                      HAS_BIAS: tl.constexpr):  # fmt: skip
        # silu(gate + bg) * (up + bu) into y's N columns; the bias is [gate's N; up's N]
        n_mask = n_glob < N
        if HAS_BIAS:
            gate = gate + tl.load(b_ptr + n_glob, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            up = up + tl.load(b_ptr + N + n_glob, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = gate * tl.sigmoid(gate) * up
        ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + n_glob.to(tl.int64)[None, :] * stride_yn
        tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _bsr_decode_kernel(
        x_ptr,
        w_ptr,
        crow_ptr,
        col_ptr,
        b_ptr,
        y_ptr,
        part_ptr,
        cnt_ptr,
        work_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_ym,
        stride_pm,
        stride_ps,
        n_rows,
        BH: tl.constexpr,
        BW: tl.constexpr,
        SPLIT: tl.constexpr,
        BAL: tl.constexpr,
        KB: tl.constexpr,
        BLOCK_M: tl.constexpr,
        EVEN_K: tl.constexpr,
        MODE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # Few tokens: the weight is the traffic. SPLIT programs share one block row, program s taking its kept
        # blocks s, s + SPLIT, ... (adjacent programs read adjacent blocks), so ~nnz / SPLIT programs keep every
        # SM's loads in flight even when a block row holds 20+ blocks. BAL > 0 (balanced by kept blocks): each
        # block row gets its own count of programs, enough that none reads more than BAL blocks, and a program
        # reads its (row, s, split) and its rows' spans from the weight's work list (balanced_work; entries of -1
        # pad the grid). The partial sums of a row meet:
        #   MODE 0  SPLIT == 1: the program owns its row and writes y itself
        #   MODE 1  each writes its fp32 partial to part[s] ([SPLIT, M, n_rows*BH]); _decode_reduce_kernel adds them
        #   MODE 2  each adds its partial into a zeroed fp32 workspace (part, [M, n_rows*BH]) with atomics, then
        #           bumps the row's arrival counter; the last to arrive takes the sum out, zeroes the sums and the
        #           counter and writes y: one launch, and the workspace is left zeroed for the next call (a
        #           balanced row of one program writes y itself)
        # ACT == GLU: block row `row` of the gate and row n_rows + row of the up projection, two accumulators; the
        # partial sums of the up rows sit n_rows * BH columns after the gate rows' (part / workspace rows are as
        # wide as the weight's 2 * n_rows * BH rows)
        pid = tl.program_id(0)
        if BAL > 0:  # (row, s, split, gate start, gate end, up start, up end, -): no row-pointer look-ups
            item = work_ptr + WORK * pid
            row = tl.load(item)
            s = tl.load(item + 1)
            split = tl.load(item + 2)
            g0 = tl.load(item + 3)
            g1 = tl.load(item + 4)
            u0 = g0
            u1 = g1
            if ACT == GLU:
                u0 = tl.load(item + 5)
                u1 = tl.load(item + 6)
        else:
            row = pid // SPLIT
            s = pid - row * SPLIT
            split = SPLIT
            g0 = tl.load(crow_ptr + row)
            g1 = tl.load(crow_ptr + row + 1)
            u0 = g0
            u1 = g1
            if ACT == GLU:
                u0 = tl.load(crow_ptr + n_rows + row)
                u1 = tl.load(crow_ptr + n_rows + row + 1)
        if row >= 0:
            _decode_program(x_ptr, w_ptr, col_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym,
                            stride_pm, stride_ps, n_rows, row, s, split, g0, g1, u0, u1, BH, BW, KB, BLOCK_M, EVEN_K,
                            MODE, HAS_BIAS, ACT, PRECISION, UPCAST)  # fmt: skip

    @triton.jit
    def _decode_program(x_ptr, w_ptr, col_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym,
                        stride_pm, stride_ps, n_rows, row, s, split, g0, g1, u0, u1, BH: tl.constexpr,
                        BW: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_K: tl.constexpr,
                        MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):  # fmt: skip
        # program s of the `split` programs of block row `row`, whose kept blocks are values[g0:g1] (a gated pair:
        # the up row's values[u0:u1]); the kernel's comment says how their sums meet
        pid_m = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BH)
        m_mask = offs_m < M
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
        acc = _decode_row(acc, x_rows, w_ptr, col_ptr, g0, g1, s, split, m_mask, K, BH, BW, KB, EVEN_K, PRECISION,
                          UPCAST)  # fmt: skip
        up = acc
        if ACT == GLU:
            up = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
            up = _decode_row(up, x_rows, w_ptr, col_ptr, u0, u1, s, split, m_mask, K, BH, BW, KB, EVEN_K, PRECISION,
                             UPCAST)  # fmt: skip
        n_glob = row * BH + offs_n
        up_off = n_rows * BH
        if MODE == 0:
            _decode_out(acc, up, b_ptr, y_ptr, offs_m, m_mask, n_glob, N, stride_ym, HAS_BIAS, ACT)
        elif MODE == 1:
            ptrs = part_ptr + s * stride_ps + offs_m.to(tl.int64)[:, None] * stride_pm + n_glob[None, :]
            tl.store(ptrs, acc, mask=m_mask[:, None])
            if ACT == GLU:
                tl.store(ptrs + up_off, up, mask=m_mask[:, None])
        elif split == 1:
            _decode_out(acc, up, b_ptr, y_ptr, offs_m, m_mask, n_glob, N, stride_ym, HAS_BIAS, ACT)
        else:
            _decode_meet(acc, up, part_ptr, cnt_ptr, b_ptr, y_ptr, offs_m, m_mask, n_glob, N, stride_ym, stride_pm,
                         n_rows, row, pid_m, split, up_off, HAS_BIAS, ACT, BLOCK_M, BH)  # fmt: skip

    @triton.jit
    def _decode_meet(acc, up, part_ptr, cnt_ptr, b_ptr, y_ptr, offs_m, m_mask, n_glob, N, stride_ym, stride_pm, n_rows,
                     row, pid_m, split, up_off, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BH: tl.constexpr):  # fmt: skip
        # MODE 2: add this program's partial sums into the zeroed workspace; the last of the row's `split`
        # programs to arrive writes y and leaves the workspace zeroed
        ws = part_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + n_glob[None, :]
        tl.atomic_add(ws, acc, mask=m_mask[:, None], sem="relaxed")
        if ACT == GLU:
            tl.atomic_add(ws + up_off, up, mask=m_mask[:, None], sem="relaxed")
        # every thread's adds are issued before the counter moves; the counter's acq_rel orders them (and,
        # for the last arrival, everyone else's) around the hand-over
        tl.debug_barrier()
        c_ptr = cnt_ptr + pid_m * n_rows + row
        arrived = tl.atomic_add(c_ptr, 1, sem="acq_rel")
        if arrived == split - 1:
            # read through the atomic unit (L2, where the others' adds landed), then put the zeros back: no
            # other program touches this row's sums or counter again in this launch
            zeros = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
            total = tl.atomic_add(ws, zeros, mask=m_mask[:, None], sem="acquire")
            tl.store(ws, zeros, mask=m_mask[:, None])
            total_up = total
            if ACT == GLU:
                total_up = tl.atomic_add(ws + up_off, zeros, mask=m_mask[:, None], sem="acquire")
                tl.store(ws + up_off, zeros, mask=m_mask[:, None])
            tl.store(c_ptr, 0)
            _decode_out(total, total_up, b_ptr, y_ptr, offs_m, m_mask, n_glob, N, stride_ym, HAS_BIAS, ACT)

    @triton.jit
    def _decode_row(acc, x_rows, w_ptr, col_ptr, start, end, s, split, m_mask, K, BH: tl.constexpr, BW: tl.constexpr,
                    KB: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
        # acc += program s's share (kept blocks s, s + split, ...; with KB > 1 the runs of KB blocks s*KB,
        # (s + split)*KB, ...) of one block row, whose kept blocks are values[start:end]
        start = start.to(tl.int64)
        end = end.to(tl.int64)
        if KB > 1:
            return _packed_row(acc, x_rows, 1, w_ptr, col_ptr, start + s * KB, end, split * KB, m_mask, K, BH, BW, KB,
                               EVEN_K, PRECISION, UPCAST)  # fmt: skip
        offs_k = tl.arange(0, BW)
        x_base = x_rows + offs_k[None, :]
        w_base = w_ptr + tl.arange(0, BH)[:, None] * BW + offs_k[None, :]
        for e in range(start + s, end, split):
            k0 = tl.load(col_ptr + e) * BW
            if EVEN_K:
                a = tl.load(x_base + k0, mask=m_mask[:, None], other=0.0)
                b = tl.load(w_base + e * (BH * BW))
            else:
                k_mask = (k0 + offs_k) < K
                a = tl.load(x_base + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                # padding columns of W must not leak (a NaN there times a zero x is still NaN)
                b = tl.load(w_base + e * (BH * BW), mask=k_mask[None, :], other=0.0)
            acc = _mma(acc, a, b, PRECISION, UPCAST)
        return acc

    @triton.jit
    def _decode_out(acc, up, b_ptr, y_ptr, offs_m, m_mask, n_glob, N, stride_ym, HAS_BIAS: tl.constexpr,
                    ACT: tl.constexpr):  # fmt: skip
        if ACT == GLU:
            _epilogue_glu(acc, up, b_ptr, y_ptr, offs_m, m_mask, n_glob, N, stride_ym, 1, HAS_BIAS)
        else:
            _epilogue(acc, b_ptr, y_ptr, offs_m, m_mask, n_glob, N, stride_ym, 1, HAS_BIAS, ACT)

    @triton.jit
    def _decode_reduce_kernel(
        p_ptr,
        b_ptr,
        y_ptr,
        N,
        stride_ps,
        stride_pm,
        stride_ym,
        up_off,
        SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr,
    ):
        # y[m, n] = act(sum_s partial[s, m, n] + bias[n]); a fixed summation order, so results are deterministic.
        # ACT == GLU: silu(gate) * up, the up sums `up_off` columns after the gate sums, its bias N after the gate's
        pid_n = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(SPLIT):
            acc += tl.load(p_ptr + s * stride_ps + m * stride_pm + offs, mask=mask, other=0.0)
            if ACT == GLU:
                up += tl.load(p_ptr + s * stride_ps + m * stride_pm + up_off + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if ACT == GLU:
                up += tl.load(b_ptr + N + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT == 1:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        if ACT == GLU:
            acc = acc * tl.sigmoid(acc) * up
        tl.store(y_ptr + m * stride_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def grouped_layout(crow: torch.Tensor, col: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """Union layout for G block rows per program: (gcrow [n_groups+1], gcol [n_union], gidx [n_union, G]).

    gidx[u, g] is the index into `values` of block (row group*G+g, column gcol[u]), or -1 when that row has
    no such block. Built on the host once per weight (it needs the index values, so it syncs).
    """
    crow_h = crow.detach().to("cpu", torch.int64)
    col_h = col.detach().to("cpu", torch.int64)
    n_rows = crow_h.numel() - 1
    n_groups = -(-n_rows // group)
    gcrow = [0]
    gcol: list[int] = []
    gidx: list[list[int]] = []
    for gi in range(n_groups):
        entries: dict[int, list[int]] = {}
        for g in range(group):
            r = gi * group + g
            if r >= n_rows:
                break
            for j in range(int(crow_h[r]), int(crow_h[r + 1])):
                entries.setdefault(int(col_h[j]), [-1] * group)[g] = j
        for c in sorted(entries):
            gcol.append(c)
            gidx.append(entries[c])
        gcrow.append(len(gcol))
    dev = crow.device
    return (
        torch.tensor(gcrow, dtype=torch.int32, device=dev),
        torch.tensor(gcol, dtype=torch.int32, device=dev),
        torch.tensor(gidx, dtype=torch.int32, device=dev).reshape(-1, group),
    )


def balanced_work(crow: torch.Tensor, nnz: int, per_program: int, gated: bool = False) -> torch.Tensor:
    """The decode kernel's work list for BAL = per_program: int32 [n_groups + nnz // per_program, WORK_WIDTH], one
    entry per program: (block row r, s, split, gate start, gate end, up start, up end, 0), block row r getting
    split = max(1, ceil(kept blocks / per_program)) programs s = 0..split-1, and its kept blocks' span in `values`
    written out so that a program reads no row pointers. n_groups is crow's block rows, or half of them for a
    `gated` pair ([gate; up], activation "silu_mul"), which splits by the longer of its gate and up rows; other
    weights repeat the gate span. Entries of -1 pad the list to a length known from the shapes alone (nnz is
    values.shape[0]). Built on the device with no host sync."""
    crow = crow.to(torch.int64)
    n_groups = (crow.numel() - 1) // 2 if gated else crow.numel() - 1
    counts = crow[1:] - crow[:-1]
    starts, ends = crow[:-1], crow[1:]
    up_starts, up_ends = starts, ends
    if gated:
        counts = torch.maximum(counts[:n_groups], counts[n_groups:])
        starts, up_starts = starts[:n_groups], starts[n_groups:]
        ends, up_ends = ends[:n_groups], ends[n_groups:]
    split = torch.clamp((counts + per_program - 1) // per_program, min=1)
    last = torch.cumsum(split, 0)
    pid = torch.arange(n_groups + nnz // per_program, device=crow.device)
    row = torch.searchsorted(last, pid, right=True)
    live = row < n_groups
    row = row.clamp(max=n_groups - 1)
    fields = [row, pid - (last[row] - split[row]), split[row], starts[row], ends[row], up_starts[row], up_ends[row]]
    work = torch.stack([torch.where(live, f, -1) for f in fields] + [torch.zeros_like(pid)], dim=1)
    return work.to(torch.int32).contiguous()


def _precision_arg(dtype: torch.dtype, precision: str) -> str:
    return precision if dtype == torch.float32 else "none"


def feature_major(t2d: torch.Tensor) -> bool:
    """Whether a [M, C] matrix is stored feature-major (a transposed view of a [C, M] row-major tensor: columns are
    contiguous runs of tokens), which the tiled and TMA kernels read and write as they are. One token, or any other
    layout, is not: those are taken token-major (row-major, made so where they are not)."""
    return _feature_major(t2d.shape, t2d.stride())


def _feature_major(shape, stride) -> bool:
    return stride[0] == 1 and shape[0] > 1 and stride[1] >= shape[0]


def _tma_ok_xy(x2d: torch.Tensor, y: torch.Tensor) -> bool:
    """tma_ok for a weight already known to be readable by TMA (a bound launch with its weight_descriptor)."""
    es = x2d.element_size()  # one stride() a tensor: each stride(i) is a dispatcher call (host cost, every launch)
    return (x2d.data_ptr() | y.data_ptr()) & 15 == 0 and (
        (max(x2d.stride()) * es) & 15 == 0 and (max(y.stride()) * es) & 15 == 0
    )


def _pointer_key(t: torch.Tensor) -> tuple:
    """One tensor's part of a specialization key (see kernels._launch.specialization)."""
    return (t.dtype, t.data_ptr() & 15 == 0)


def _int_keys(ints: tuple) -> tuple:
    return specialization((), ints)[1]


def tma_ok(x2d: torch.Tensor, y: torch.Tensor, values: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned base pointers and row strides (a feature-major matrix's rows are its
    columns)."""
    if TensorDescriptor is None:
        return False
    return values.data_ptr() & 15 == 0 and _tma_ok_xy(x2d, y)


def _descriptor(t2d: torch.Tensor, box_m: int, box_c: int):
    """(TMA descriptor, transposed?) of a [M, C] matrix in boxes of box_m tokens by box_c features: over t2d
    itself when token-major, over t2d.T ([C, M]) with boxes [box_c, box_m] when feature-major."""
    (m, c), (sm, sc) = t2d.shape, t2d.stride()
    if _feature_major((m, c), (sm, sc)):  # described as t2d.T: [C, M], strides (sc, 1)
        return _prechecked_descriptor(t2d, [c, m], [sc, sm], [box_c, box_m]), True
    return _prechecked_descriptor(t2d, [m, c], [sm, sc], [box_m, box_c]), False


def _descriptor_defaults() -> dict | None:
    """The defaulted fields of this Triton's TensorDescriptor (None when it is not a plain dataclass)."""
    if TensorDescriptor is None or not dataclasses.is_dataclass(TensorDescriptor):
        return None
    fields = dataclasses.fields(TensorDescriptor)
    if {"base", "shape", "strides", "block_shape"} - {f.name for f in fields}:
        return None
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


_DESCRIPTOR_DEFAULTS = _descriptor_defaults()


def _prechecked_descriptor(base: torch.Tensor, shape: list, strides: list, block_shape: list):
    """TensorDescriptor(base, shape, strides, block_shape) without its constructor's checks, which cost about as
    much host time per call as the rest of a launch: x and y get a descriptor on every call, after tma_ok checked
    what those checks would (16-byte aligned base and row stride, unit last stride, M >= 1; the box is the launch's
    own). A Triton whose TensorDescriptor is not the dataclass this was written for gets the constructor."""
    if _DESCRIPTOR_DEFAULTS is None:
        return TensorDescriptor(base, shape, strides, block_shape)
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(_DESCRIPTOR_DEFAULTS)
    desc.base, desc.shape, desc.strides, desc.block_shape = base, shape, strides, block_shape
    return desc


def launch(
    x2d: torch.Tensor,
    values: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    gidx: torch.Tensor | None,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    n_out: int,
    k_in: int,
    activation: str | None,
    precision: str,
    config: dict,
    wrap=None,
) -> torch.Tensor:
    """Run the kernel into y [M, n_out]. `crow`/`col` are the grouped layout when config['G'] > 1; a config with
    SPLIT >= 1 runs the decode kernel instead. `wrap` (torch.library.wrap_triton, inside a
    torch.library.triton_op) makes the tiled kernel's launch visible to torch.compile; TMA and decode
    configurations are not launched that way (superblock::bsr_linear_triton refuses them: ops.tiled_config).
    activation "silu_mul": n_out is y's width N, the weight [gate; up] has twice its block rows (and groups); no TMA.
    Callers that run one weight many times keep its `Launch` (launch_for) instead."""
    run = launch_for(values, crow, col, gidx, bias is not None, n_out, k_in, activation, precision, config)
    if wrap is None:
        return run(x2d, values, crow, col, gidx, bias, y)
    # traced by torch.compile (inside a triton_op): its generated code launches the kernel
    args = run.tiled_args(x2d, values, crow, col, gidx, bias if bias is not None else y, y)
    wrap(_bsr_linear_kernel)[run.tiled_grid(x2d.shape[0])](*args, **run.options)
    return y


def kernel_variant(config: dict, activation: str | None = None) -> str:
    """The kernel a launch configuration runs: "decode" (SPLIT >= 1; KB > 1 packs its steps too, BAL > 0 balances
    its programs by kept blocks), "packed" (the
    tiled kernel with KB > 1 kept blocks per step), "tma" (TMA loads: G == 1, not a gated pair), else "tiled".
    kernels.dispatch shows the table."""
    if int(config.get("SPLIT", 0)) >= 1:
        return "decode"
    if int(config.get("KB", 1)) > 1:
        return "packed"
    if config.get("TMA") and int(config.get("G", 1)) == 1 and activation != "silu_mul":
        return "tma"
    return "tiled"


_launches: dict[tuple, Launch] = {}


def launch_for(values, crow, col, gidx, has_bias: bool, n_out: int, k_in: int, activation, precision: str,
               config: dict) -> Launch:  # fmt: skip
    """The process-wide Launch of this weight layout (shapes and dtypes, not the tensors) and configuration."""
    key = (
        tuple(values.shape[1:]), values.dtype, crow.numel(), crow.dtype, col.dtype, gidx is not None, has_bias, n_out,
        k_in, activation, precision, *(int(config.get(k, 0)) for k in ("BLOCK_M", "G", "num_warps", "num_stages",
                                                                        "TMA", "SPLIT", "KB", "BAL")),
    )  # fmt: skip
    if any(isinstance(v, torch.SymInt) for v in (*key, *key[0])):  # symbolic sizes (a trace): nothing to keep
        return Launch(values, crow, has_bias, n_out, k_in, activation, precision, config)
    found = _launches.get(key)
    if found is None:
        found = _launches[key] = Launch(values, crow, has_bias, n_out, k_in, activation, precision, config)
    return found


class Launch:
    """The kernel launch of one weight layout and configuration, with everything that does not depend on x worked
    out once: a call computes the grid and the specialization of x and y, and launches the compiled kernel directly
    (kernels._launch). Layers keep theirs with their plan; `launch()` looks one up per call."""

    def __init__(self, values, crow, has_bias: bool, n_out: int, k_in: int, activation, precision: str,
                 config: dict) -> None:  # fmt: skip
        self.bh, self.bw = int(values.shape[1]), int(values.shape[2])
        self.group, self.block_m = int(config.get("G", 1)), int(config["BLOCK_M"])
        self.split, self.kb = int(config.get("SPLIT", 0)), int(config.get("KB", 1))
        self.bal = int(config.get("BAL", 0)) if self.split else 0
        self.n_out, self.k_in, self.activation, self.has_bias = n_out, k_in, activation, has_bias
        self.n_weight_rows = crow.numel() - 1
        self.n_groups = self.n_weight_rows // 2 if activation == "silu_mul" else self.n_weight_rows
        self.act, self.prec = ACT_CODES[activation], _precision_arg(values.dtype, precision)
        self.even_k = k_in % self.bw == 0
        self.kernel = kernel_variant(config, activation)
        self.tma = self.kernel == "tma"
        self.options = {"num_warps": int(config["num_warps"]), "num_stages": int(config["num_stages"])}
        warps, stages = self.options["num_warps"], self.options["num_stages"]
        self._tiled = _launch.KernelLaunch(_bsr_linear_kernel, warps, stages)
        self._tma = _launch.KernelLaunch(_bsr_linear_tma_kernel, warps, stages) if self.tma else None
        self._decode = _launch.KernelLaunch(_bsr_decode_kernel, warps, stages) if self.split else None
        self._reduce = _launch.KernelLaunch(_decode_reduce_kernel, 4, 3) if self.split > 1 or self.bal else None
        # a balanced launch's most programs per block row (MODE 1 sizes its partial sums by it)
        block_cols = -(-k_in // self.bw)
        self.bal_split = max(1, -(-block_cols // self.bal)) if self.bal else 0

    def tiled_grid(self, M: int) -> tuple[int]:
        return (-(-M // self.block_m) * self.n_groups,)

    def tiled_args(self, x2d, values, crow, col, gidx, b_arg, y, rows: tuple | None = None) -> tuple:
        """The tiled kernel's arguments. `rows`: (M, x's row stride, y's row stride) for x and y of any rank with
        unit last strides (flat calls: no 2-D views made); None: read from x2d and y, 2-D."""
        if rows is None:
            (sx0, sx1), (sy0, sy1), M = x2d.stride(), y.stride(), x2d.shape[0]
        else:
            (M, sx0, sy0), sx1, sy1 = rows, 1, 1
        return (
            x2d, values, crow, col, gidx if gidx is not None else col, b_arg, y, M, self.n_out, self.k_in, sx0, sx1,
            sy0, sy1, self.n_groups, self.bh, self.bw, self.group, self.kb, self.block_m, self.even_k, self.has_bias,
            self.act, self.prec, INTERPRET,
        )  # fmt: skip

    def tma_args(self, x2d, w_desc, crow, col, b_arg, y) -> tuple[tuple, bool, bool]:
        """(the TMA kernel's arguments, x described transposed?, y described transposed?): x's and y's descriptors
        are built here, the weight's (w_desc) is the caller's."""
        bm, bh, bw = self.block_m, self.bh, self.bw
        (x_desc, x_t), (y_desc, y_t) = _descriptor(x2d, bm, bw), _descriptor(y, bm, bh)
        return self.tma_tail(x_desc, w_desc, crow, col, b_arg, y_desc, x_t, y_t), x_t, y_t

    def tma_tail(self, x_desc, w_desc, crow, col, b_arg, y_desc, x_t: bool, y_t: bool) -> tuple:
        """The TMA kernel's arguments around the descriptors."""
        return (
            x_desc, w_desc, crow, col, b_arg, y_desc, self.n_out, self.n_groups, self.bh, self.bw, self.block_m,
            self.has_bias, self.act, self.prec, INTERPRET, x_t, y_t,
        )  # fmt: skip

    def __call__(self, x2d, values, crow, col, gidx, bias, y, w_desc=None) -> torch.Tensor:
        """y [M, n_out] = the product for x2d [M, k_in] (contiguous rows), on the tensors this layout describes.
        `w_desc`: weight_descriptor(values), when the caller keeps it (else built here for a TMA launch)."""
        b_arg = bias if bias is not None else y
        if self.split:
            return self._run_decode(x2d, values, crow, col, gidx, b_arg, y)
        M = x2d.shape[0]
        if self.tma and tma_ok(x2d, y, values):
            w_desc = w_desc if w_desc is not None else weight_descriptor(values)
            args, x_t, y_t = self.tma_args(x2d, w_desc, crow, col, b_arg, y)
            self._tma(self.tiled_grid(M), (x_t, y_t, specialization((crow, col, b_arg), (self.n_out,))), args, y.device)
            return y
        args = self.tiled_args(x2d, values, crow, col, gidx, b_arg, y)
        self._tiled(self.tiled_grid(M), specialization(args[:7], args[7:15]), args, y.device)
        return y

    def bind(self, values, crow, col, gidx, w_desc=None) -> tuple:
        """`__call__` for one weight's tensors, as (`call(x2d, bias, y) -> y`, `flat(x, m, bias, y) -> y`): their
        part of the specialization key and the TMA checks of the weight worked out once, so a call looks only at x,
        y and the bias. `flat` takes x [..., k_in] and y [..., n_out] of any rank, both contiguous, m rows: no 2-D
        views of them are made (each is a dispatcher call on every product). `w_desc`: weight_descriptor(values)
        (None: the tiled kernel, where TMA cannot read the weight)."""
        k, n = self.k_in, self.n_out
        if self.split:  # the decode kernel: few tokens, its own host work

            def decode(x2d: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
                return self(x2d, values, crow, col, gidx, bias, y, w_desc)

            def decode_flat(x: torch.Tensor, m: int, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
                decode(x.view(m, k), bias, y.view(m, n))
                return y

            return decode, decode_flat
        gcol = gidx if gidx is not None else col
        w_key = specialization((values, crow, col, gcol), (n, k, self.n_groups))
        tma_key = specialization((crow, col), (n,))[0]
        use_tma = self.tma and w_desc is not None and TensorDescriptor is not None
        es = values.element_size()
        flat_tma = use_tma and (k * es) & 15 == 0 and (n * es) & 15 == 0  # contiguous rows: the stride checks, once
        bm, bh, bw = self.block_m, self.bh, self.bw

        def call(x2d: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
            b_arg = bias if bias is not None else y
            grid = self.tiled_grid(x2d.shape[0])
            if use_tma and _tma_ok_xy(x2d, y):
                args, x_t, y_t = self.tma_args(x2d, w_desc, crow, col, b_arg, y)
                self._tma(grid, (x_t, y_t, tma_key, _pointer_key(b_arg)), args, y.device)
                return y
            args = self.tiled_args(x2d, values, crow, col, gidx, b_arg, y)
            key = (w_key, _pointer_key(x2d), _pointer_key(b_arg), _pointer_key(y), _int_keys(args[7:8] + args[10:14]))
            self._tiled(grid, key, args, y.device)
            return y

        def flat(x: torch.Tensor, m: int, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
            b_arg = bias if bias is not None else y
            grid = self.tiled_grid(m)
            if flat_tma and (x.data_ptr() | y.data_ptr()) & 15 == 0:
                x_desc = _prechecked_descriptor(x, [m, k], [k, 1], [bm, bw])
                y_desc = _prechecked_descriptor(y, [m, n], [n, 1], [bm, bh])
                args = self.tma_tail(x_desc, w_desc, crow, col, b_arg, y_desc, False, False)
                self._tma(grid, (False, False, tma_key, _pointer_key(b_arg)), args, y.device)
                return y
            args = self.tiled_args(x, values, crow, col, gidx, b_arg, y, (m, k, n))
            key = (w_key, _pointer_key(x), _pointer_key(b_arg), _pointer_key(y), _int_keys((m, k, 1, n, 1)))
            self._tiled(grid, key, args, y.device)
            return y

        return call, flat

    def _run_decode(self, x2d, values, crow, col, work, b_arg, y) -> torch.Tensor:
        """The decode kernel: grid (block rows * SPLIT, token tiles), or with BAL one program per entry of the work
        list `work` (balanced_work). Partial sums of a row meet in the device's zeroed workspace, one launch (MODE
        2), or, when no workspace can be had (first call inside a CUDA-graph capture, many tokens), in a fresh fp32
        tensor that a second kernel reduces (MODE 1): no host sync either way, and inside a capture that tensor
        comes from the graph's private pool."""
        if feature_major(x2d):  # few tokens: the decode kernel reads x token-major
            x2d = x2d.contiguous()
        if y.shape[0] > 1 and y.stride(1) != 1:  # and writes y token-major
            tmp = torch.empty(y.shape, device=y.device, dtype=y.dtype)
            return y.copy_(self._run_decode(x2d, values, crow, col, work, b_arg, tmp))
        M, bh, block_m = x2d.shape[0], self.bh, self.block_m
        split = self.bal_split if self.bal else self.split
        m_tiles = -(-M // block_m)
        n_sums = self.n_weight_rows * bh
        mode, part, cnt, stride_ps = 0, y, crow, 0
        if split > 1 or self.bal:  # partial sums as wide as the weight's rows (silu_mul: gate's, then up's)
            ws = decode_workspace(y.device, M * n_sums, m_tiles * self.n_groups)
            if ws is not None:
                mode, (part, cnt) = 2, ws
            else:  # a balanced row of fewer programs leaves slots of part unwritten: they must read as zeros
                mode = 1
                part = (torch.zeros if self.bal else torch.empty)(split, M, n_sums, device=y.device,
                                                                  dtype=torch.float32)  # fmt: skip
                stride_ps = part.stride(0)
        work_arg = work if self.bal else crow
        args = (
            x2d, values, crow, col, b_arg, y, part, cnt, work_arg, M, self.n_out, self.k_in, x2d.stride(0),
            y.stride(0), n_sums if mode else 0, stride_ps, self.n_groups, bh, self.bw, self.split, self.bal, self.kb,
            block_m, self.even_k, mode, self.has_bias, self.act, self.prec, INTERPRET,
        )  # fmt: skip
        spec = (mode, specialization(args[:9], args[9:17]))  # MODE is the one constexpr that varies per call
        grid0 = work.shape[0] if self.bal else self.n_groups * split
        self._decode((grid0, m_tiles), spec, args, y.device)
        if mode == 1:
            args = (part, b_arg, y, self.n_out, part.stride(0), part.stride(1), y.stride(0), self.n_groups * bh, split,
                    REDUCE_BLOCK_N, self.has_bias, self.act)  # fmt: skip
            grid = (-(-self.n_out // REDUCE_BLOCK_N), M)
            self._reduce(grid, specialization(args[:3], args[3:8]), args, y.device)
        return y


def weight_descriptor(values: torch.Tensor):
    """The TMA descriptor of a weight's blocks ([nnz * bh, bw] in boxes of one block); None where TMA cannot read
    them (no descriptors in this Triton, a base not 16-byte aligned). A bound launch builds it once per weight."""
    if TensorDescriptor is None or values.data_ptr() % 16:
        return None
    bh, bw = int(values.shape[1]), int(values.shape[2])
    return TensorDescriptor(values, [values.shape[0] * bh, bw], [bw, 1], [bh, bw])


REDUCE_BLOCK_N = 256
# MODE 2's zeroed workspaces (fp32 sums, int32 arrival counters), one pair per device, kept zero by the kernel
# itself. Never freed: a CUDA graph that captured a launch keeps their addresses. Up to this many fp32 sums.
WORKSPACE_MAX = 64 * 32768
_workspaces: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
_retired: list[tuple[torch.Tensor, torch.Tensor]] = []


def decode_workspace(device: torch.device, n_sums: int, n_counters: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The device's zeroed (sums, counters) workspace with room for this launch, grown outside CUDA-graph
    captures only (a capture would allocate from the graph's private pool): None when it cannot be had now.

    Calls on one device share it, so two decode launches must not run at the same time on two streams of one
    device (the stream order of one stream, eager or replayed, serializes them)."""
    cuda = device.type == "cuda"
    if n_sums > WORKSPACE_MAX or not (cuda or INTERPRET):
        return None
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else -1
    ws = _workspaces.get(index)
    if ws is not None and ws[0].numel() >= n_sums and ws[1].numel() >= n_counters:
        return ws
    if cuda and torch.cuda.is_current_stream_capturing():
        return None
    if ws is not None:
        _retired.append(ws)  # a captured graph may still point at it
    size = max(n_sums, 16 * 16384, 0 if ws is None else ws[0].numel())
    count = max(n_counters, 4096, 0 if ws is None else ws[1].numel())
    ws = outside_graph_pools(
        lambda: (
            torch.zeros(size, device=device, dtype=torch.float32),
            torch.zeros(count, device=device, dtype=torch.int32),
        ),
        device,
    )
    _workspaces[index] = ws
    return ws


def outside_graph_pools(build, device: torch.device):
    """build() with its CUDA allocations in the caching allocator's ordinary pool, finished before return.

    A tensor that outlives the call it was made in (a workspace kept for later launches) must not come from a CUDA
    graph's private pool: torch.compile's mode="reduce-overhead" runs its warm-up calls with every allocation of the
    calling thread routed to the graph's pool, and a pool tensor it does not know about is an error there ("tensor(s)
    in the cudagraph pool not tracked as outputs") or, worse, memory a replay overwrites. The routing is per thread,
    so the allocation runs on a short-lived thread of its own."""
    if device.type != "cuda":
        return build()
    made: list = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            with torch.cuda.device(device):
                made.append(build())
                torch.cuda.current_stream().synchronize()  # ready before any stream of the caller uses it
        except BaseException as exc:  # re-raised on the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=work, name="superblock-workspace")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]
