"""Permutations that fit blocks: reorder hidden units so that large weights share tiles, function unchanged.

A feed-forward block computes fc2(act(fc1(x))): permuting its hidden units (fc1's output rows and bias together with
fc2's input columns) changes nothing it computes, but it changes which weights share a tile of the block grid.
Attention allows the same inside each head (q and k dims together, since only q . k is read; v dims together with
the output projection's columns) and, when a tile spans several heads, the order of whole heads. The search below
gathers large weights into the same tiles so that top-k tiles keep more of the weight magnitude.

Search (per coupled group of tensors): start from the identity, from units sorted by magnitude and from units
sorted by the block they are largest in; then alternate (1) top-k tiles of the permuted weights (layerwise, at the
target sparsity) and (2) a capacity-constrained greedy assignment of units to tile rows by the magnitude each unit
would keep there. The best permutation is kept only when it keeps more magnitude (sum of squared weights in the
kept tiles) than the identity. It is applied in place to the stored parameters (and to optimizer state and
follower copies, e.g. an EMA model), so nothing needs undoing at export.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from superblock.sparsity.blocks import BlockSize, kept_blocks, tile_sum
from superblock.sparsity.targets import is_conv1d, select_targets
from superblock.sparsity.tiling import Overrides, Tiling

PERMUTE_MODES = ("none", "mlp", "mlp+heads")
_ITERATIONS = 8


@dataclass(frozen=True)
class Slot:
    """The indices [start, start + n * unit) along `dim` of a stored parameter: n units of `unit` indices each."""

    module: nn.Module
    name: str
    dim: int
    start: int = 0


@dataclass
class Coupling:
    """Tensors that must be permuted together: `n` units of `unit` consecutive indices in every slot; with `chunk`,
    units move only within consecutive chunks of that many units (the dims of one attention head)."""

    name: str
    n: int
    slots: list[Slot]
    unit: int = 1
    chunk: int | None = None


@dataclass
class PermutationReport:
    """What `permute_model` did: kept magnitude (fraction of squared weight in top-k tiles) before / after."""

    mode: str
    kept_before: float = 0.0
    kept_after: float = 0.0
    couplings: int = 0
    permuted: int = 0
    skipped: list[str] = field(default_factory=list)
    perms: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "kept_before": self.kept_before,
            "kept_after": self.kept_after,
            "couplings": self.couplings,
            "permuted": self.permuted,
        }

    def __str__(self) -> str:
        gain = self.kept_after - self.kept_before
        text = (
            f"permutation ({self.mode}): kept magnitude {self.kept_before:.4f} -> {self.kept_after:.4f} "
            f"({gain:+.4f}); {self.permuted} of {self.couplings} coupled groups permuted"
        )
        return text + (f"; skipped: {'; '.join(self.skipped)}" if self.skipped else "")


def stored(module: nn.Module, name: str) -> torch.Tensor:
    """The stored parameter (under a block mask: the original weight, not the masked value)."""
    plists = getattr(module, "parametrizations", None)
    if plists is not None and name in plists:
        return plists[name].original
    return module._parameters[name]


# ------------------------------------------------------------------------------------------------- discovery


def _no_params(modules: Iterable[nn.Module]) -> bool:
    return all(next(m.parameters(recurse=True), None) is None for m in modules)


def _mlp_coupling(name: str, module: nn.Module) -> Coupling | None:
    """timm Mlp (fc1 / fc2), torchvision MLPBlock (0 / 3), GPT-2 MLP (c_fc / c_proj), Llama MLP (gate/up/down)."""
    kids = dict(module.named_children())
    fc1, fc2 = kids.get("fc1"), kids.get("fc2")
    if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and fc1.out_features == fc2.in_features:
        if not _no_params(m for k, m in kids.items() if k not in ("fc1", "fc2")):
            return None  # a norm between the layers (timm's scale_mlp_norm) would need permuting too
        return Coupling(name, fc1.out_features, [Slot(fc1, "weight", 0), *_bias(fc1), Slot(fc2, "weight", 1)])
    if isinstance(module, nn.Sequential) and len(module) == 5 and type(module).__name__ == "MLPBlock":
        first, last = module[0], module[3]
        if isinstance(first, nn.Linear) and isinstance(last, nn.Linear) and _no_params([module[1], module[2]]):
            return Coupling(
                name, first.out_features, [Slot(first, "weight", 0), *_bias(first), Slot(last, "weight", 1)]
            )
    c_fc, c_proj = kids.get("c_fc"), kids.get("c_proj")
    if c_fc is not None and c_proj is not None and is_conv1d(c_fc) and is_conv1d(c_proj):
        return Coupling(name, c_fc.nf, [Slot(c_fc, "weight", 1), Slot(c_fc, "bias", 0), Slot(c_proj, "weight", 0)])
    gate, up, down = kids.get("gate_proj"), kids.get("up_proj"), kids.get("down_proj")
    if all(isinstance(m, nn.Linear) for m in (gate, up, down)) and gate.out_features == down.in_features:
        slots = [Slot(gate, "weight", 0), *_bias(gate), Slot(up, "weight", 0), *_bias(up), Slot(down, "weight", 1)]
        return Coupling(name, gate.out_features, slots)
    return None


def _bias(linear: nn.Module) -> list[Slot]:
    return [Slot(linear, "bias", 0)] if getattr(linear, "bias", None) is not None else []


def _attention_layout(module: nn.Module) -> tuple[list[tuple[nn.Module, str, int]], nn.Module, int, str, int] | None:
    """(q/k/v projection: [(module, weight name, out dim)], bias names, output projection, its in dim, heads)."""
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return None
        return [(module, "in_proj_weight", 0)], module.out_proj, 1, "in_proj_bias", module.num_heads
    kids = dict(module.named_children())
    heads = getattr(module, "num_heads", None)
    qkv, proj = kids.get("qkv"), kids.get("proj")
    if isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int):
        norms = [kids.get("q_norm"), kids.get("k_norm"), kids.get("norm")]
        if not _no_params(m for m in norms if m is not None) or qkv.out_features != 3 * proj.in_features:
            return None  # q/k norms over head dims (timm qk_norm) would need permuting too
        return [(qkv, "weight", 0)], proj, 1, "bias", heads
    c_attn, c_proj = kids.get("c_attn"), kids.get("c_proj")
    if c_attn is not None and c_proj is not None and is_conv1d(c_attn) and is_conv1d(c_proj) and isinstance(heads, int):
        if getattr(module, "is_cross_attention", False) or c_attn.nf != 3 * c_proj.nf:
            return None
        return [(c_attn, "weight", 1)], c_proj, 0, "bias", heads
    return None


def _attention_couplings(
    name: str, module: nn.Module, tiling: Tiling, names: dict[int, str]
) -> list[Coupling] | str | None:
    """Within-head couplings (q with k, v with the output projection) when the finer of the two tiles along the
    permuted dims fits in a head; a coupling of whole heads when both tiles span whole heads; a reason string when
    the shapes allow neither. A tile may be taller than it is wide: the q/k coupling is left out when q/k's tile
    spans whole heads (moving dims inside a head changes none of its tiles)."""
    layout = _attention_layout(module)
    if layout is None:
        return None
    [(qkv, wname, dim)], proj, proj_dim, bias_name, heads = layout
    width = stored(qkv, wname).shape[dim] // 3
    bq = tiling.stored(_weight_name(names, qkv, wname), qkv)[dim]
    bp = tiling.stored(_weight_name(names, proj, "weight"), proj)[proj_dim]
    head_dim = width // heads
    bias = [] if getattr(qkv, bias_name, None) is None else [bias_name]

    def slots(parts: Sequence[int], with_proj: bool) -> list[Slot]:
        out = [Slot(qkv, wname, dim, p * width) for p in parts]
        out += [Slot(qkv, bn, 0, p * width) for bn in bias for p in parts]
        return out + ([Slot(proj, "weight", proj_dim)] if with_proj else [])

    if head_dim % min(bq, bp) == 0:
        qk = [Coupling(f"{name}:qk", width, slots((0, 1), False), chunk=head_dim)] if head_dim % bq == 0 else []
        return [*qk, Coupling(f"{name}:v", width, slots((2,), True), chunk=head_dim)]
    if bq % head_dim == 0 and bp % head_dim == 0 and width % max(bq, bp) == 0:
        return [Coupling(f"{name}:heads", heads, slots((0, 1, 2), True), unit=head_dim)]
    return f"{name}: head dim {head_dim} and tiles of {bq} / {bp} along it do not divide one another"


def _weight_name(names: dict[int, str], module: nn.Module, param: str) -> str:
    module_name = names.get(id(module), "")
    return f"{module_name}.{param}" if module_name else param


def find_couplings(model: nn.Module, mode: str, block: BlockSize | Tiling) -> tuple[list[Coupling], list[str]]:
    """The coupled groups of `model` that `mode` permutes, in model order, and why others were left alone.
    `block`: one (out rows, in cols) tile for every weight, or a Tiling with per-weight overrides."""
    if mode not in PERMUTE_MODES:
        raise ValueError(f"unknown permutation mode {mode!r}: use one of {PERMUTE_MODES}")
    found: list[Coupling] = []
    skipped: list[str] = []
    if mode == "none":
        return found, skipped
    tiling = _tiling(block)
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in model.named_modules():
        mlp = _mlp_coupling(name, module)
        if mlp is not None:
            found.append(mlp)
        elif mode == "mlp+heads":
            attn = _attention_couplings(name, module, tiling, names)
            if isinstance(attn, str):
                skipped.append(attn)
            elif attn:
                found.extend(attn)
    return found, skipped


# ---------------------------------------------------------------------------------------------------- search


@dataclass
class _View:
    """One targeted weight slot of a coupling: the magnitude profile of every unit over the other axis' blocks."""

    key: tuple[int, str]  # the weight (several views may share one: q and k rows of qkv)
    row0: int  # first tile row (along the permuted dim) of the slot
    groups: int  # tile rows the slot spans
    group: int  # units per tile row (tiles taller than wide group fc1's rows and fc2's columns differently)
    energy: torch.Tensor  # [n, C] float64: squared weight of unit u in block column c


class _Problem:
    """Kept magnitude of a coupling's targeted weights as a function of its permutation.

    Each targeted weight groups the units into its own tile rows: with tiles taller than wide, fc1 groups its output
    rows by the tile's height and fc2 its input columns by the tile's width. The search assigns units to slots of
    the finest grouping (`fine` units); a coarser grouping is a union of consecutive fine slots, so it must be a
    multiple of the finest."""

    def __init__(self, coupling: Coupling, targeted: dict[tuple[int, str], BlockSize], level: float) -> None:
        self.c, self.level = coupling, level
        self.views: list[_View] = []
        self.base: dict[tuple[int, str], torch.Tensor] = {}  # weight -> its tile energies, permuted dim first
        for s in coupling.slots:
            key = (id(s.module), s.name)
            if key in targeted:
                self._add_view(s, key, targeted[key])
        if not self.views:
            raise _Skip(f"{coupling.name}: no targeted weight")
        self.fine = min(v.group for v in self.views)
        if any(v.group % self.fine for v in self.views):
            sizes = sorted({v.group * coupling.unit for v in self.views})
            raise _Skip(f"{coupling.name}: tiles of {sizes} along its units do not nest")
        self.slots = -(-coupling.n // self.fine)

    def _add_view(self, s: Slot, key: tuple[int, str], block: BlockSize) -> None:
        c = self.c
        # The search runs on the CPU in float64 whatever the weights' device: small matrices, exact ties.
        w = stored(s.module, s.name).detach().movedim(s.dim, 0).to("cpu", torch.float64).pow(2)
        bd, bo = block[s.dim], block[1 - s.dim]
        if s.start % bd or bd % c.unit:
            raise _Skip(f"{c.name}: block {bd} does not fit its slot at {s.start}")
        group = bd // c.unit
        self.base.setdefault(key, tile_sum(w, (bd, bo)))
        rows = w[s.start : s.start + c.n * c.unit].reshape(c.n, c.unit, -1).sum(1)
        self.views.append(_View(key, s.start // bd, -(-c.n // group), group, tile_sum(rows, (1, bo))))

    def grouped(self, view: _View, perm: torch.Tensor) -> torch.Tensor:
        e = view.energy[perm]
        pad = view.groups * view.group - len(e)
        if pad:
            e = torch.cat([e, e.new_zeros(pad, e.shape[1])])
        return e.reshape(view.groups, view.group, -1).sum(1)

    def on_slots(self, view: _View, mask: torch.Tensor) -> torch.Tensor:
        """A view's per-tile-row mask [groups, C] repeated onto the fine slots [slots, C]."""
        return mask.repeat_interleave(view.group // self.fine, 0)[: self.slots]

    def evaluate(self, perm: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        """(kept magnitude, every view's kept-tile mask [groups, C]) under `perm`."""
        grids = {k: g.clone() for k, g in self.base.items()}
        for v in self.views:
            grids[v.key][v.row0 : v.row0 + v.groups] = self.grouped(v, perm)
        kept, masks = 0.0, {}
        for k, g in grids.items():
            top = torch.topk(g.reshape(-1), kept_blocks(g.numel(), self.level)).indices
            masks[k] = torch.zeros(g.numel(), dtype=torch.float64).index_fill_(0, top, 1.0).view_as(g)
            kept += float(g.reshape(-1)[top].sum())
        return kept, [masks[v.key][v.row0 : v.row0 + v.groups] for v in self.views]

    def total(self) -> float:
        return float(sum(g.sum() for g in self.base.values()))

    def capacities(self) -> torch.Tensor:
        cap = torch.full((self.slots,), self.fine, dtype=torch.long)
        cap[-1] = self.c.n - self.fine * (self.slots - 1)
        return cap

    def allowed(self) -> torch.Tensor | None:
        """[n, slots] bool: unit u may move to fine slot g (same attention head), or None for no constraint."""
        chunk = self.c.chunk
        if chunk is None:
            return None
        unit_chunk = torch.arange(self.c.n) // chunk
        slot_chunk = (torch.arange(self.slots) * self.fine) // chunk
        return unit_chunk[:, None] == slot_chunk[None, :]


class _Skip(Exception):
    """A coupling the permutation search leaves alone (the message says why)."""


def _assign(gain: torch.Tensor, capacity: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Tile row of every unit: rounds in which each free unit proposes its best row with room left and every row
    takes its best proposers up to its room (greedy; every unit is placed since the rows' room sums to n)."""
    n = gain.shape[0]
    gain = gain if allowed is None else gain.masked_fill(~allowed, float("-inf"))
    row = torch.full((n,), -1, dtype=torch.long)
    room = capacity.clone()
    while (free := (row < 0).nonzero().flatten()).numel():
        g = gain[free].masked_fill((room == 0)[None, :], float("-inf"))
        value, best = g.max(dim=1)
        order = torch.argsort(value, descending=True, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        b = best[order]
        counts = torch.bincount(b, minlength=len(room))
        rank = torch.arange(len(b)) - (torch.cumsum(counts, 0) - counts)[b]
        take = rank < room[b]
        row[free[order[take]]] = b[take]
        room -= torch.bincount(b[take], minlength=len(room))
    return row


def _perm_from_rows(row: torch.Tensor) -> torch.Tensor:
    """Positions in tile-row order (units of one row keep their relative order)."""
    return torch.argsort(row, stable=True)


def _refine(problem: _Problem, perm: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Alternate top-k tiles and greedy re-assignment from `perm`; the best permutation seen."""
    best, best_perm = problem.evaluate(perm)[0], perm
    capacity, allowed = problem.capacities(), problem.allowed()
    for _ in range(_ITERATIONS):
        _, masks = problem.evaluate(perm)
        gain = sum(v.energy @ problem.on_slots(v, m).T for v, m in zip(problem.views, masks, strict=True))
        perm = _perm_from_rows(_assign(gain, capacity, allowed))
        kept = problem.evaluate(perm)[0]
        if kept <= best * (1 + 1e-12):
            break
        best, best_perm = kept, perm
    return best, best_perm


def _starts(problem: _Problem) -> list[torch.Tensor]:
    """Starting permutations: identity, units by magnitude, units by their largest block (then magnitude)."""
    n, chunk = problem.c.n, problem.c.chunk or problem.c.n
    energy = torch.cat([v.energy for v in problem.views], dim=1)
    total = energy.sum(1)
    head = torch.arange(n) // chunk
    dominant = energy.argmax(1)
    by_size = torch.argsort(-total, stable=True)
    by_size = by_size[torch.argsort(head[by_size], stable=True)]
    by_block = by_size[torch.argsort(dominant[by_size], stable=True)]
    by_block = by_block[torch.argsort(head[by_block], stable=True)]
    return [torch.arange(n), by_size, by_block]


@contextmanager
def _one_thread() -> Iterator[None]:
    """The search's tensors are small (units x tile rows, float64) and its steps many: with several intra-op
    threads per process, and several runs on one host (a grid), the threads' hand-offs cost more than the work
    (minutes for SmolLM2's 30 MLPs, seconds on one thread). The caller's thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def search(problem: _Problem) -> tuple[float, float, torch.Tensor]:
    """(kept magnitude of the identity, of the best permutation found, that permutation)."""
    identity = torch.arange(problem.c.n)
    before = problem.evaluate(identity)[0]
    best, best_perm = before, identity
    for start in _starts(problem):
        kept, perm = _refine(problem, start)
        if kept > best * (1 + 1e-9):
            best, best_perm = kept, perm
    return before, best, best_perm


# ------------------------------------------------------------------------------------------------- applying


def _index(slot: Slot, coupling: Coupling, perm: torch.Tensor, device: torch.device) -> torch.Tensor:
    unit = coupling.unit
    idx = (perm[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1) + slot.start
    return idx.to(device)


@torch.no_grad()
def _permute_slot(tensors: Sequence[torch.Tensor], slot: Slot, coupling: Coupling, perm: torch.Tensor) -> None:
    """Permute the slot's indices along its dim in every tensor of `tensors` (the parameter and its companions)."""
    span = coupling.n * coupling.unit
    for t in tensors:
        idx = _index(slot, coupling, perm, t.device)
        part = t.narrow(slot.dim, slot.start, span)
        part.copy_(t.index_select(slot.dim, idx))


def _companions(param: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """Optimizer state of `param` shaped like it (Adam moments, SGD momentum): permuted with it."""
    out = []
    for opt in optimizers:
        for value in opt.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                out.append(value)
    return out


def apply_permutations(
    model: nn.Module,
    perms: dict[str, torch.Tensor],
    block: BlockSize | Tiling,
    mode: str,
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> None:
    """Permute `model`'s coupled tensors in place by `perms` ({coupling name: permutation}), with their optimizer
    state. The same call on a copy of the model (an EMA copy) permutes it the same way."""
    couplings, _ = find_couplings(model, mode, block)
    by_name = {c.name: c for c in couplings}
    missing = sorted(set(perms) - set(by_name))
    if missing:
        raise ValueError(f"cannot permute {missing}: no such coupled group in {type(model).__name__}")
    for name, perm in perms.items():
        coupling = by_name[name]
        for slot in coupling.slots:
            param = stored(slot.module, slot.name)
            _permute_slot([param, *_companions(param, optimizers)], slot, coupling, perm)


# ---------------------------------------------------------------------------------------------------- public


def _tiling(block: BlockSize | Tiling) -> Tiling:
    return block if isinstance(block, Tiling) else Tiling.of(block)


def _targeted(
    model: nn.Module,
    tiling: Tiling,
    targets: Sequence[str] | str,
    exclude: Sequence[str],
    skip_first_block: bool,
    skip_head: bool,
) -> dict[tuple[int, str], BlockSize]:
    """{(id(module), parameter name): its stored tile} of every targeted weight."""
    found = select_targets(model, targets, exclude, skip_first_block=skip_first_block, skip_head=skip_head)
    return {(id(t.module), t.param_name): tiling.stored(t.name, t.module) for t in found}


@torch.no_grad()
def kept_magnitude(model: nn.Module, targeted: dict[tuple[int, str], BlockSize], sparsity: float) -> float:
    """Fraction of the targeted weights' squared magnitude in their top-k tiles (layerwise, at `sparsity`);
    `targeted`: {(id(module), parameter name): stored tile}."""
    kept = total = 0.0
    for module in model.modules():
        for name in [n for n in ("weight", "in_proj_weight") if (id(module), n) in targeted]:
            block = targeted[(id(module), name)]
            energy = tile_sum(stored(module, name).detach().double().pow(2), block).reshape(-1)
            kept += float(torch.topk(energy, kept_blocks(energy.numel(), sparsity)).values.sum())
            total += float(energy.sum())
    return kept / total if total else 1.0


def permute_model(
    model: nn.Module,
    mode: str,
    *,
    block_size: BlockSize,
    sparsity: float,
    block_overrides: Overrides | None = None,
    targets: Sequence[str] | str = ("mlp", "attn"),
    exclude: Sequence[str] = (),
    skip_first_block: bool = False,
    skip_head: bool = True,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    followers: Sequence[nn.Module] = (),
) -> PermutationReport:
    """Permute hidden units (and, with mode="mlp+heads", attention dims / heads) of `model` in place so that top-k
    tiles of the targeted weights keep more magnitude; the model computes the same function.

    `optimizers`: their state of the permuted parameters is permuted too; `followers`: copies of the model (EMA)
    permuted the same way. Works on plain and on masked models (the stored weights are permuted; scores are not:
    see `reset_scores`). Tiles are (out rows, in cols), `block_overrides` as `sparsify` takes them; a tile taller
    than wide groups the hidden units by its height in one layer and by its width in the next, and the search
    places units for both."""
    tiling = Tiling.of(block_size, block_overrides)
    couplings, skipped = find_couplings(model, mode, tiling)
    targeted = _targeted(model, tiling, targets, exclude, skip_first_block, skip_head)
    report = PermutationReport(mode, skipped=skipped, couplings=len(couplings))
    report.kept_before = kept_magnitude(model, targeted, sparsity)
    with _one_thread():
        for coupling in couplings:
            try:
                problem = _Problem(coupling, targeted, sparsity)
            except _Skip as why:
                report.skipped.append(str(why))
                continue
            before, after, perm = search(problem)
            if after > before * (1 + 1e-9):
                report.perms[coupling.name] = perm
    if report.perms:
        apply_permutations(model, report.perms, tiling, mode, optimizers)
        for follower in followers:
            apply_permutations(follower, report.perms, tiling, mode)
    report.permuted = len(report.perms)
    report.kept_after = kept_magnitude(model, targeted, sparsity)
    return report


@torch.no_grad()
def reset_scores(
    model: nn.Module, score_init: str, optimizers: Sequence[torch.optim.Optimizer] = (), seed: int | None = None
) -> None:
    """New tile scores after the weights were permuted under existing masks (a tile's learned score no longer
    describes the tile): drawn again by `score_init` (magnitude: from the permuted weights), their optimizer state
    dropped. The caller refreshes the masks."""
    from superblock.sparsity.api import iter_block_masks
    from superblock.sparsity.mask import init_scores

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for _, module, pname, mask in iter_block_masks(model):
        weight = module.parametrizations[pname].original
        mask.scores.copy_(init_scores(weight, mask.block, score_init, generator))
        for opt in optimizers:
            opt.state.pop(mask.scores, None)
