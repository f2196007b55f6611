"""Every Triton kernel of the package (the BSR products and the training mask kernels) compiled for Hopper (sm_90)
ahead of time, on the CPU.

Compiling needs no GPU (Triton's front end, its passes and the bundled ptxas), so a kernel change that the CPU
interpreter runs but the compiler rejects (a constexpr used where a runtime value is needed, branches of a runtime
`if` with different types, a helper called with the wrong arguments) fails here, in CI, rather than on the device.
Whether a kernel is correct is the interpreter tests' and the GPU suite's question, and whether it is fast the GPU
check's. About a second a compilation on 2 cores.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from superblock.kernels import _triton_bsr as tb  # noqa: E402

POINTERS = {
    "x_ptr": "*bf16",
    "w_ptr": "*bf16",
    "b_ptr": "*bf16",
    "y_ptr": "*bf16",
    "p_ptr": "*fp32",
    "part_ptr": "*fp32",
    "crow_ptr": "*i32",
    "col_ptr": "*i32",
    "gidx_ptr": "*i32",
    "cnt_ptr": "*i32",
    "work_ptr": "*i32",
}


def compile_sm90(fn, constexprs: dict, types: dict | None = None, warps: int = 4, stages: int = 2):
    """triton.compile of `fn` for sm_90: pointers as POINTERS says, `types` for the others given, the rest i32."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {**POINTERS, **(types or {})}
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    try:
        return triton.compile(
            ASTSource(fn, sig, constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
    except (FileNotFoundError, PermissionError) as err:  # no ptxas in this Triton's install: nothing to check here
        pytest.skip(f"this Triton cannot assemble for sm_90 here: {err}")


COMMON = {"HAS_BIAS": True, "PRECISION": "ieee", "UPCAST": False}


@pytest.mark.parametrize(
    "group,kb,bw,act",
    [(1, 1, 64, 0), (1, 1, 64, 1), (2, 1, 16, 0), (1, 4, 16, 2), (1, 2, 32, 1)],
    ids=["plain", "gelu", "grouped", "packed-glu", "packed-gelu"],
)
def test_the_tiled_kernel_compiles(group, kb, bw, act):
    const = {**COMMON, "BH": 64, "BW": bw, "G": group, "KB": kb, "BLOCK_M": 128, "EVEN_K": True, "ACT": act}
    assert compile_sm90(tb._bsr_linear_kernel, const).asm["ptx"]


@pytest.mark.parametrize("transposed", [False, True], ids=["token-major", "feature-major"])
def test_the_tma_kernel_compiles(transposed):
    box = "tensordesc<bf16[64, 128]>" if transposed else "tensordesc<bf16[128, 64]>"
    types = {"x_desc": box, "w_desc": "tensordesc<bf16[64, 64]>", "y_desc": box}
    const = {**COMMON, "BH": 64, "BW": 64, "BLOCK_M": 128, "ACT": 1, "X_T": transposed, "Y_T": transposed}
    assert compile_sm90(tb._bsr_linear_tma_kernel, const, types).asm["ptx"]


# (BAL, SPLIT, MODE, ACT, KB, BW): the SPLIT split in each reduction mode, the balanced split (BAL) in both, gated
# pairs, packed steps of a thin tile
DECODE_CASES = [
    (0, 1, 0, 1, 1, 64),
    (0, 8, 2, 0, 1, 64),
    (0, 4, 1, 2, 1, 64),
    (2, 2, 2, 0, 1, 64),
    (4, 1, 2, 2, 1, 64),
    (3, 2, 1, 0, 1, 64),
    (8, 2, 2, 0, 4, 16),
]


@pytest.mark.parametrize("bal,split,mode,act,kb,bw", DECODE_CASES)
def test_the_decode_kernel_compiles(bal, split, mode, act, kb, bw):
    const = {**COMMON, "BH": 64, "BW": bw, "SPLIT": split, "BAL": bal, "KB": kb, "BLOCK_M": 16, "EVEN_K": True,
             "MODE": mode, "ACT": act}  # fmt: skip
    assert compile_sm90(tb._bsr_decode_kernel, const).asm["ptx"]


@pytest.mark.parametrize("act", [0, 2])
def test_the_decode_reduction_compiles(act):
    const = {"SPLIT": 4, "BLOCK_N": tb.REDUCE_BLOCK_N, "HAS_BIAS": True, "ACT": act}
    assert compile_sm90(tb._decode_reduce_kernel, const, warps=4, stages=3).asm["ptx"]


@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)], ids=["both", "weight", "scores"])
def test_the_training_mask_kernels_compile(grads):
    """The fused masked-weight kernels of eager CUDA training (superblock.sparsity.fused): forward and backward."""
    from superblock.sparsity import fused

    if fused.triton is None:
        pytest.skip("no Triton kernels in superblock.sparsity.fused here")
    types = {"w_ptr": "*fp32", "m_ptr": "*fp32", "out_ptr": "*bf16", "g_ptr": "*bf16", "gw_ptr": "*fp32",
             "gs_ptr": "*fp32"}  # fmt: skip
    assert compile_sm90(fused._masked_weight_kernel, {"BH": 64, "BW": 16}, types).asm["ptx"]
    const = {"BH": 64, "BW": 16, "GRAD_WEIGHT": grads[0], "GRAD_SCORES": grads[1]}
    assert compile_sm90(fused._masked_weight_backward_kernel, const, types).asm["ptx"]
