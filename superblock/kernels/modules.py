"""nn.Modules over the block-sparse linear op: a block-sparse Linear, a block-sparse self-attention, GELU fusion."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from superblock.kernels import _runners, ops
from superblock.kernels import dispatch as _dispatch
from superblock.kernels import tuning as _tuning
from superblock.kernels.bsr_linear import ACTIVATIONS, BACKENDS, bsr_to_dense, get_fp32_precision
from superblock.kernels.dispatch import Choice, Plan
from superblock.sparsity.blocks import normalize_block_size


def dense_to_bsr(
    weight: torch.Tensor, block_size: int | Sequence[int], index_dtype: torch.dtype = torch.int32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [nnz, bh, bw], crow [rows+1], col [nnz]) of a dense (out, in) weight; all-zero blocks are dropped.

    Dimensions that are not block multiples are zero-padded at the end (bottom / right), matching the block
    grid of superblock.sparsity masks. Syncs with the device once (the number of blocks kept).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    bh, bw = normalize_block_size(block_size)
    out_f, in_f = weight.shape
    n_rows, n_cols = -(-out_f // bh), -(-in_f // bw)
    w = weight.detach()
    if (n_rows * bh, n_cols * bw) != (out_f, in_f):
        w = F.pad(w, (0, n_cols * bw - in_f, 0, n_rows * bh - out_f))
    blocks = w.reshape(n_rows, bh, n_cols, bw).permute(0, 2, 1, 3)
    keep = blocks.ne(0).any(dim=-1).any(dim=-1)  # [rows, cols]
    values = blocks[keep].contiguous()
    crow = torch.zeros(n_rows + 1, dtype=index_dtype, device=w.device)
    crow[1:] = keep.sum(dim=1).cumsum(0).to(index_dtype)
    col = keep.nonzero()[:, 1].to(index_dtype)
    return values, crow, col


class BlockSparseLinear(nn.Module):
    """A Linear whose weight is block-sparse (BSR buffers), computed by torch.ops.superblock.bsr_linear; inference.

    Buffers: `values` [nnz, bh, bw], `crow_indices`, `col_indices` (int32) and `bias` (or None). The
    number of blocks is data dependent: build with from_dense / from_bsr; load_state_dict resizes the
    buffers to the checkpoint's. `activation="gelu"` fuses an exact GELU into the kernel's epilogue.

    Dispatch is decided per layer and token bucket (tuning.token_bucket: powers of two), outside any trace:
    `dispatch` maps a bucket to {"backend", "config", "precision"}. An entry is made on the first eager call
    with that many tokens (backend="auto" measures on CUDA, see kernels.tuning) or by `prepare(tokens)`;
    what a choice needs (the dense weight for "dense", grouped layouts, int64 indices) is built then and kept as
    non-persistent buffers, so the hot path is a dict lookup and one kernel. Under torch.compile /
    torch.export the layer is one custom op (or F.linear for a dense choice) with no guards on tensor
    identity; a bucket that was never prepared gets a static choice there (CUDA: triton with its default
    configuration; CPU: torch's BSR for fp32 square blocks, else dense), never a measurement.
    `tuning_target` ("eager" | "graph" | None = kernels.get_tuning_target()) is what `auto` optimizes.
    `out_layout = "feature"` makes an eager Triton call write y feature-major (a transposed view: each output
    feature's tokens contiguous), for a next block-sparse layer whose thin tiles read x in long runs
    (hand_off_feature_major sets it where one layer feeds another); compiled and dense calls stay token-major.
    After editing the buffers in place or replacing them, call `reset()`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: int | Sequence[int],
        nnz: int = 0,
        bias: bool = True,
        activation: str | None = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        bh, bw = normalize_block_size(block_size)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.block_size = (bh, bw)
        self.dispatch: dict[int, dict] = {}
        self._plans: dict[int, Plan] = {}
        self._activation = activation
        self._backend = backend
        self.tuning_target: str | None = None
        self.fp32_precision: str | None = None
        self.out_layout = "token"
        n_rows = -(-self.out_features // bh)
        fk = {"device": device, "dtype": dtype}
        self.register_buffer("values", torch.zeros(nnz, bh, bw, **fk))
        self.register_buffer("crow_indices", torch.zeros(n_rows + 1, dtype=torch.int32, device=device))
        self.register_buffer("col_indices", torch.zeros(nnz, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(self.out_features, **fk) if bias else None)

    # activation / backend may be changed after construction (fuse_linear_gelu, users): choices start over
    @property
    def activation(self) -> str | None:
        return self._activation

    @activation.setter
    def activation(self, value: str | None) -> None:
        if value not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {value!r}")
        self._activation = value
        self._forget()

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value
        self._forget()

    @classmethod
    def from_bsr(
        cls,
        values: torch.Tensor,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        shape: Sequence[int],
        bias: torch.Tensor | None = None,
        activation: str | None = None,
        backend: str = "auto",
    ) -> BlockSparseLinear:
        out_f, in_f, _, _ = _runners.check_bsr(values, crow_indices, col_indices, shape)
        mod = cls(in_f, out_f, tuple(values.shape[1:]), values.shape[0], bias is not None, activation, backend)
        if bias is not None and bias.shape != (out_f,):
            raise ValueError(f"bias must be [{out_f}], got {tuple(bias.shape)}")
        mod.values = values.detach().contiguous()
        mod.crow_indices = crow_indices.detach().to(torch.int32)
        mod.col_indices = col_indices.detach().to(torch.int32)
        mod.bias = None if bias is None else bias.detach().to(values.dtype)
        return mod

    @classmethod
    def from_dense(
        cls,
        linear_or_weight: nn.Linear | torch.Tensor,
        bias: torch.Tensor | None = None,
        block_size: int | Sequence[int] | None = None,
        activation: str | None = None,
        backend: str = "auto",
    ) -> BlockSparseLinear:
        """From an nn.Linear (its bias is used unless `bias` is given) or an (out, in) weight whose pruned
        blocks are exactly zero (e.g. after superblock.fold_masks). Non-multiple dims are padded."""
        if block_size is None:
            raise ValueError("block_size is required (an int or (bh, bw))")
        if isinstance(linear_or_weight, nn.Linear):
            weight = linear_or_weight.weight
            if bias is None and linear_or_weight.bias is not None:
                bias = linear_or_weight.bias
        elif isinstance(linear_or_weight, torch.Tensor):
            weight = linear_or_weight
        else:
            raise ValueError(f"expected nn.Linear or a weight tensor, got {type(linear_or_weight).__name__}")
        values, crow, col = dense_to_bsr(weight, block_size)
        return cls.from_bsr(values, crow, col, weight.shape, bias, activation, backend)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def density(self) -> float:
        bh, bw = self.block_size
        total = -(-self.out_features // bh) * -(-self.in_features // bw)
        return self.values.shape[0] / total

    def to_dense_weight(self) -> torch.Tensor:
        return bsr_to_dense(self.values, self.crow_indices, self.col_indices, self.shape)

    def dense_weight_buffer(self) -> str:
        """Build (once, eager code) the dense weight a dense choice runs on; returns its buffer name."""
        return self._derived("_dense_weight", self.to_dense_weight, traced=False)

    # ------------------------------------------------------------------------------------------- hot path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self._differentiable(x)
        m = x.numel() // self.in_features
        traced = type(x) is not torch.Tensor or torch.compiler.is_compiling()
        plan = self._traced_plan(x, m) if traced else self._plans.get(m)
        if plan is None:
            plan = self._plan(x, m)
        call = plan.call
        if call == "bound":  # eager triton: the launch bound to this weight (never inside a trace)
            bias = self._buffers["bias"]  # what self.bias returns, without nn.Module's ~1 us attribute fallback
            if self.out_layout == "feature" and m > 1:
                n = _runners.out_width(self.out_features, self._activation)
                out = torch.empty(n, m, device=x.device, dtype=x.dtype).t().view(*x.shape[:-1], n)
                return plan.run(x, bias, out)
            return plan.run(x, bias)
        # a plan names its tensors (buffers): torch.export swaps buffers for its own, so they are read here
        if call == "dense":
            names = plan.tensors
            y = F.linear(x, self._buffers[names] if type(names) is str else names, self.bias)
            return F.gelu(y) if self._activation == "gelu" else y
        crow, col, gidx = (self._buffers[n] if type(n) is str else n for n in plan.tensors)
        activation = self._activation or "none"
        args = (x, self.values, crow, col, gidx, self.bias, self.out_features, activation)
        if call == "inductor":  # inductor launches the tiled kernel itself
            return ops.bsr_linear_triton_op(*args, plan.precision, plan.config)
        if call == "opaque":
            return ops.bsr_linear_op(*args, plan.backend, plan.precision, plan.config)
        return ops.bsr_linear_impl(*args, plan.backend, plan.precision, plan.config)  # eager, no dispatcher (~10 us)

    def _differentiable(self, x: torch.Tensor) -> torch.Tensor:
        if self._backend == "triton":
            raise ValueError("backend='triton' is inference only (no backward); use backend='dense' to train")
        y = F.linear(x, self.to_dense_weight(), self.bias)
        return F.gelu(y) if self._activation == "gelu" else y

    # ------------------------------------------------------------------------------------------- dispatch

    def prepare(self, tokens: int | Sequence[int]) -> BlockSparseLinear:
        """Decide (and, for backend="auto" on CUDA, measure) this layer's choice for these token counts now,
        and build what the choices need, so later calls - eager, compiled or captured - only look them up.
        Runs on random inputs of the layer's dtype and device; eager code only."""
        for m in [tokens] if isinstance(tokens, int) else tokens:
            x = torch.randn(int(m), self.in_features, device=self.values.device).to(self.values.dtype)
            with torch.no_grad():
                self._plan(x, int(m))
        return self

    def choices(self) -> dict[int, Choice]:
        """This layer's decisions so far, per token bucket (kernels.tuning.token_bucket)."""
        return {b: Choice.from_dict(e, self.precision) for b, e in self.dispatch.items()}

    def set_choice(self, bucket: int, choice: Choice | dict | None) -> None:
        """Pin the choice for a token bucket (None: forget it, so the next eager call decides again)."""
        if choice is None:
            self.dispatch.pop(int(bucket), None)
        else:
            entry = choice if isinstance(choice, Choice) else Choice.from_dict(choice, self.precision)
            self.dispatch[int(bucket)] = entry.as_dict()
        self._plans.clear()

    def set_tuning_target(self, target: str | None) -> None:
        """What `auto` optimizes here ("eager" | "graph" | None = the global target); a change forgets the
        choices made for the old one."""
        if _tuning.check_target(target, allow_none=True) != self.tuning_target:
            self.tuning_target = target
            self._forget()

    def clear_plans(self) -> None:
        """Drop the per-token-count plans (kept choices stay); the next call of each size rebuilds its plan."""
        self._plans.clear()

    @property
    def precision(self) -> str:
        """The fp32 precision of this layer's triton products (its own, else the module-wide setting)."""
        return self.fp32_precision or get_fp32_precision()

    def reset(self) -> None:
        """Forget the dispatch table and the derived tensors (after editing values / indices in place)."""
        for name in [n for n in self._buffers if n.startswith("_")]:
            del self._buffers[name]
        self.dispatch.clear()
        self._plans.clear()

    def _forget(self) -> None:
        if hasattr(self, "_plans"):
            self.dispatch.clear()
            self._plans.clear()

    def _plan(self, x: torch.Tensor, m: int) -> Plan:
        traced = type(x) is not torch.Tensor or torch.compiler.is_compiling()
        bucket = _tuning.token_bucket(m)
        entry = self.dispatch.get(bucket)
        if entry is None:
            entry = self._static_choice(x) if traced else self._choose(x.reshape(-1, self.in_features))
            if not traced:
                self.dispatch[bucket] = entry
        plan = self._build(entry, x, traced)
        if not traced:
            self._plans[m] = plan
        return plan

    def _traced_plan(self, x: torch.Tensor, m) -> Plan:
        """The plan inside torch.compile / torch.export: the prepared choice of the bucket holding m, found by
        comparisons only, so with dynamic shapes the graph holds for the whole bucket (guards m <= b, m > b / 2)
        instead of one token count; the static choice (_static_choice) for a bucket never prepared."""
        entry = None
        for b, e in self.dispatch.items():
            if m <= b and (b <= 16 or m > b // 2):
                entry = e
                break
        return self._build(entry if entry is not None else self._static_choice(x), x, traced=True)

    def _static_choice(self, x: torch.Tensor) -> dict:
        """What a never-prepared bucket runs inside a trace: no measurement, no host sync."""
        return _dispatch.static_choice(x, self.values, self._backend, self.precision).as_dict()

    def _choose(self, x2d: torch.Tensor) -> dict:
        args = (x2d, self.values, self.crow_indices, self.col_indices, self.shape, self.bias, self._activation)
        return _dispatch.choose(args, self._backend, self.precision, target=self.tuning_target).as_dict()

    def _derived(self, name: str, build, traced: bool, n: int = 1):
        """The buffer name(s) of a tensor (n == 1) or n tensors derived from the weight, built once in eager code
        and kept as non-persistent buffers (they follow .to() and are not saved). Inside a trace, when they were
        never built: the tensors themselves, computed in the graph, or None when `build` cannot be traced."""
        names = [name] if n == 1 else [f"{name}_{i}" for i in range(n)]
        if names[0] not in self._buffers:
            if traced:
                return None
            with torch.inference_mode(False), torch.no_grad():
                built = build()
            for k, t in zip(names, [built] if n == 1 else built, strict=True):
                self.register_buffer(k, t, persistent=False)
        return names[0] if n == 1 else tuple(names)

    def _build(self, entry: dict, x: torch.Tensor, traced: bool) -> Plan:
        """The plan of a choice (dispatch.build_plan); its tensors are buffer names, or (inside a trace, for a layer
        never prepared) tensors computed in the graph."""
        weight = _dispatch.Weight(
            self.values, "crow_indices", "col_indices", self.shape, self.bias is not None, self._activation,
            self._buffers.__getitem__, self.to_dense_weight,
        )  # fmt: skip
        choice = Choice.from_dict(entry, entry.get("precision", self.precision))
        return _dispatch.build_plan(
            choice, x.device, traced, weight, lambda *a: self._derived(a[0], a[1], traced, a[2])
        )

    # ------------------------------------------------------------------------------------------- state

    def _apply(self, fn, recurse=True):
        before = (self.values.dtype, self.values.device)
        out = super()._apply(fn, recurse)
        self._plans.clear()  # they hold the old tensors
        if (self.values.dtype, self.values.device) != before:
            self.dispatch.clear()  # choices are per dtype and device
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nnz is data dependent: take the checkpoint's buffer sizes
        for name in ("values", "col_indices"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.shape != self._buffers[name].shape:
                old = self._buffers[name]
                self._buffers[name] = torch.empty(t.shape, dtype=old.dtype, device=old.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.reset()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"density={self.density:.3f}, bias={self.bias is not None}, activation={self.activation}, "
            f"backend={self.backend}"
        )


# ----------------------------------------------------------------------------------------------------------
# GELU fusion


def _is_exact_gelu(m: nn.Module) -> bool:
    return type(m).__name__ == "GELU" and getattr(m, "approximate", "none") in ("none", None)


def fuse_linear_gelu(module: nn.Module) -> int:
    """Fold `BlockSparseLinear -> GELU` pairs into one kernel (activation="gelu"); returns how many.

    Recognises any nn.Sequential (torchvision MLPBlock: Linear, GELU, Dropout, Linear, Dropout) and modules
    with `fc1` / `act` attributes (timm Mlp: fc1, act, drop1, norm, fc2, drop2). The GELU becomes
    nn.Identity; dropout stays where it was, so the result is the same function. Only exact (erf) GELU is
    fused. Replace the Linear layers with BlockSparseLinear first.
    """
    fused = 0
    for sub in list(module.modules()):
        if isinstance(sub, nn.Sequential):
            for i in range(len(sub) - 1):
                lin, act = sub[i], sub[i + 1]
                if isinstance(lin, BlockSparseLinear) and lin.activation is None and _is_exact_gelu(act):
                    lin.activation = "gelu"
                    sub[i + 1] = nn.Identity()
                    fused += 1
        fc1, act = getattr(sub, "fc1", None), getattr(sub, "act", None)
        if isinstance(fc1, BlockSparseLinear) and fc1.activation is None and act is not None and _is_exact_gelu(act):
            fc1.activation = "gelu"
            sub.act = nn.Identity()
            fused += 1
    return fused


def hand_off_feature_major(module: nn.Module) -> int:
    """Let every BlockSparseLinear whose output goes straight into another one write it feature-major
    (`out_layout = "feature"`), so the second reads x in runs of tokens; returns how many. Recognises the layouts
    fuse_linear_gelu does (nn.Sequential with only Identity / Dropout between the two; `fc1` / `fc2` attributes
    with an Identity `act`). Any consumer reads such a tensor correctly: this changes speed, never results."""
    pairs = []
    for sub in module.modules():
        if isinstance(sub, nn.Sequential):
            layers = [m for m in sub if not isinstance(m, (nn.Identity, nn.Dropout))]
            pairs += zip(layers, layers[1:], strict=False)
        elif isinstance(getattr(sub, "act", None), nn.Identity):
            pairs.append((getattr(sub, "fc1", None), getattr(sub, "fc2", None)))
    handed = 0
    for first, second in pairs:
        if isinstance(first, BlockSparseLinear) and isinstance(second, BlockSparseLinear):
            first.out_layout = "feature"
            handed += 1
    return handed


def prepare_layers(module: nn.Module, tokens: int | Sequence[int]) -> int:
    """BlockSparseLinear.prepare(tokens) for every block-sparse layer of a module: each decides (on CUDA with
    backend="auto", measures) its choice for these token counts now, in eager code, so that a compiled or captured
    forward later finds it (inside a trace nothing is measured: a token bucket never prepared runs a stand-in).
    Returns how many layers were prepared."""
    layers = [m for m in module.modules() if isinstance(m, BlockSparseLinear)]
    for layer in layers:
        layer.prepare(tokens)
    return len(layers)


def choice_counts(module: nn.Module) -> dict[int, dict[str, int]]:
    """Per token bucket a layer was prepared or called for: how many BlockSparseLinear layers run each backend (a
    Triton choice by its kernel: "triton:decode", "triton:tiled", ...). Which share of a model's products run our
    kernels, and which went to torch's BSR path or to dense."""
    counts: dict[int, dict[str, int]] = {}
    for mod in module.modules():
        if not isinstance(mod, BlockSparseLinear):
            continue
        for bucket, choice in mod.choices().items():
            label = choice.backend
            if choice.backend == "triton" and choice.config:
                label += ":" + _dispatch.kernel_variant(choice.config, mod.activation)
            row = counts.setdefault(int(bucket), {})
            row[label] = row.get(label, 0) + 1
    return {b: dict(sorted(row.items())) for b, row in sorted(counts.items())}


# ----------------------------------------------------------------------------------------------------------
# attention


class BlockSparseMultiheadAttention(nn.Module):
    """Drop-in for an inference nn.MultiheadAttention whose projections are block-sparse.

    nn.MultiheadAttention reads `in_proj_weight` / `out_proj.weight` directly (F.multi_head_attention_forward),
    so swapping its Linear submodules does nothing: replace the whole module with `from_mha(mha, ...)`.
    q/k/v come from one bsr_linear over the packed (3E, E) in_proj (self-attention: query is key is value),
    attention from F.scaled_dot_product_attention, then the out_proj. Returns (output, None): attention
    weights are never materialised, whatever `need_weights` says.
    """

    def __init__(
        self,
        in_proj: nn.Module,
        out_proj: nn.Module,
        num_heads: int,
        batch_first: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_proj = in_proj
        self.out_proj = out_proj
        self.num_heads = int(num_heads)
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.embed_dim = out_proj.out_features if hasattr(out_proj, "out_features") else None

    @classmethod
    def from_mha(
        cls,
        mha: nn.MultiheadAttention,
        block_size: int | Sequence[int] | None = None,
        backend: str = "auto",
        out_block_size: int | Sequence[int] | None = None,
        sparse_in_proj: bool = True,
        sparse_out_proj: bool = True,
    ) -> BlockSparseMultiheadAttention:
        """From an nn.MultiheadAttention with packed in_proj (kdim == vdim == embed_dim) and zeroed blocks."""
        if mha.in_proj_weight is None:
            raise ValueError("only nn.MultiheadAttention with a packed in_proj_weight (kdim == vdim == embed_dim)")
        if block_size is None and (sparse_in_proj or sparse_out_proj):
            raise ValueError("block_size is required")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("bias_k / bias_v / add_zero_attn are not supported")
        w_in, b_in = mha.in_proj_weight, mha.in_proj_bias
        if sparse_in_proj:
            in_proj = BlockSparseLinear.from_dense(w_in, b_in, block_size, backend=backend)
        else:
            in_proj = nn.Linear(
                w_in.shape[1], w_in.shape[0], bias=b_in is not None, device=w_in.device, dtype=w_in.dtype
            )
            in_proj.weight.data.copy_(w_in.detach())
            if b_in is not None:
                in_proj.bias.data.copy_(b_in.detach())
        if sparse_out_proj:
            out_proj = BlockSparseLinear.from_dense(mha.out_proj, None, out_block_size or block_size, backend=backend)
        else:
            out_proj = mha.out_proj
        mod = cls(in_proj, out_proj, mha.num_heads, mha.batch_first, mha.dropout)
        mod.embed_dim = mha.embed_dim
        return mod

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        self_attn = query is key and key is value
        if self_attn and key_padding_mask is None and attn_mask is None and not is_causal:
            o = self._native_forward(query)
            if o is not None:
                return o, None
        unbatched = query.dim() == 2
        if unbatched:  # (L, E) -> (1, L, E)
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        E = self._embed(query)
        H = self.num_heads
        B, L, _ = query.shape
        S = key.shape[1]
        q, k, v = self._project(query, key, value, self_attn, E)
        mask = None
        if attn_mask is not None or key_padding_mask is not None:
            mask = _sdpa_mask(attn_mask, key_padding_mask, B, H, L, S, q.dtype)
        o = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )
        o = self.out_proj(o.transpose(1, 2).reshape(B, L, E))
        if unbatched:
            o = o.squeeze(0)
        elif not self.batch_first:
            o = o.transpose(0, 1)
        return o, None

    def _native_forward(self, query: torch.Tensor) -> torch.Tensor | None:
        """torch's fused MHA kernel (as nn.MultiheadAttention's fast path) when both projections run dense for
        this input in eager inference; None otherwise."""
        if query.dim() != 3 or torch.is_grad_enabled() or type(query) is not torch.Tensor:
            return None
        if torch.compiler.is_compiling():
            return None
        native = self._native_weights(query)
        if native is None:
            return None
        x = query if self.batch_first else query.transpose(0, 1)
        o = torch._native_multi_head_attention(x, x, x, self._embed(x), self.num_heads, *native, None, False, True)
        return o[0] if self.batch_first else o[0].transpose(0, 1)

    def _project(self, query, key, value, self_attn: bool, E: int) -> tuple[torch.Tensor, ...]:
        """q, k, v as (B, H, L|S, E/H): one kernel over the packed (3E, E) projection for self-attention; for
        cross-attention each input is projected and its slice kept."""
        H = self.num_heads
        B, L, _ = query.shape
        if self_attn:
            return self.in_proj(query).view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4).unbind(0)
        S = key.shape[1]
        q = self.in_proj(query)[..., :E].reshape(B, L, H, E // H).transpose(1, 2)
        k = self.in_proj(key)[..., E : 2 * E].reshape(B, S, H, E // H).transpose(1, 2)
        v = self.in_proj(value)[..., 2 * E :].reshape(B, S, H, E // H).transpose(1, 2)
        return q, k, v

    def _embed(self, x: torch.Tensor) -> int:
        return self.embed_dim or x.shape[-1]

    def _native_weights(self, x: torch.Tensor) -> tuple | None:
        """(in_w, in_b, out_w, out_b) when both projections run dense for this many tokens (nn.Linear, or a
        BlockSparseLinear whose choice here is dense), else None. Dict lookups only once the layers are planned."""
        if self.training:
            return None
        m = x.numel() // x.shape[-1]
        out = []
        for proj in (self.in_proj, self.out_proj):
            if isinstance(proj, BlockSparseLinear):
                if proj.activation is not None or proj.bias is None:
                    return None
                plan = proj._plans.get(m)
                if plan is None:
                    plan = proj._plan(x, m)
                if plan[0] != "dense":
                    return None
                out += (proj._buffers[plan[1]], proj.bias)
            elif type(proj) is nn.Linear and proj.bias is not None:
                out += (proj.weight, proj.bias)
            else:
                return None
        return tuple(out)


def _sdpa_mask(attn_mask, key_padding_mask, B, H, L, S, dtype):
    """nn.MultiheadAttention masks (bool True = blocked, or additive float) as one additive SDPA mask."""
    out = None

    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    if attn_mask is not None:
        m = additive(attn_mask)
        out = m.view(B, H, L, S) if m.dim() == 3 else m.view(1, 1, L, S)
    if key_padding_mask is not None:
        m = additive(key_padding_mask).view(B, 1, 1, S)
        out = m if out is None else out + m
    return out
