"""Public API: sparsify a model, refresh or fold its masks, measure block sparsity, reach the mask scores."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from superblock.sparsity.blocks import grid_shape, tile_sum
from superblock.sparsity.controller import SparsityController
from superblock.sparsity.mask import SCORE_INITS, BlockMask
from superblock.sparsity.parametrized import own_class, share_class
from superblock.sparsity.schedule import SparsitySchedule, check_sparsity
from superblock.sparsity.targets import Target, is_conv1d, linear_weights, select_targets
from superblock.sparsity.tiling import Levels, Overrides, Tiling

CONTROLLER_ATTR = "_superblock_controller"


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, int]
    block: tuple[int, int]
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / self.total


@dataclass
class SparsityReport:
    """What `sparsify` did (or would do, with dry_run=True): one row per masked weight."""

    rows: list[LayerRow] = field(default_factory=list)
    sparsity: float = 0.0
    allocation: str = "layerwise"
    dry_run: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    @property
    def density(self) -> float:
        """Fraction of tiles kept over all masked weights (tile-count weighted)."""
        total = sum(r.total for r in self.rows)
        return sum(r.kept for r in self.rows) / total if total else 1.0

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "allocation": self.allocation,
            "density": self.density,
            "layers": [
                {
                    "name": r.name,
                    "shape": list(r.shape),
                    "block": list(r.block),
                    "kept": r.kept,
                    "total": r.total,
                    "density": r.density,
                }
                for r in self.rows
            ],
        }

    def __str__(self) -> str:
        width = max([len("layer"), *(len(r.name) for r in self.rows)])
        head = f"{'layer':<{width}} {'shape':>12} {'block':>8} {'kept/total':>12} {'density':>8}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            shape, block = f"{r.shape[0]}x{r.shape[1]}", f"{r.block[0]}x{r.block[1]}"
            lines.append(f"{r.name:<{width}} {shape:>12} {block:>8} {f'{r.kept}/{r.total}':>12} {r.density:>8.3f}")
        verb = "would mask" if self.dry_run else "masked"
        lines.append(
            f"{verb} {len(self.rows)} weights, {self.allocation} allocation, target sparsity {self.sparsity:.3f}, "
            f"tiles kept {self.density:.3f}"
        )
        return "\n".join(lines)


def get_controller(model: nn.Module) -> SparsityController | None:
    """The model's SparsityController, or None for a dense model. Unwraps DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    ctrl = model.__dict__.get(CONTROLLER_ATTR)
    return ctrl if isinstance(ctrl, SparsityController) else None


def refresh_masks(model: nn.Module) -> None:
    """Recompute every hard mask of `model` from its current scores, now. A no-op on a dense model.

    `SparsityController.step()` (after each optimizer step) and `load_state_dict` already do this. Call it after
    anything else that changes the scores: a hand-written update loop that does not call `step()`, or an
    in-place write such as `scores.data.copy_(...)`. Masks are never recomputed inside forward.
    """
    controller = get_controller(model)
    if controller is not None:
        controller.refresh()


def _refresh_after_load(module: nn.Module, _incompatible_keys: object) -> None:
    # A module-level function, not a closure: a deepcopy of the model (EMA) shares the hook and must refresh its
    # own controller, found through the module it is called with.
    refresh_masks(module)


def iter_block_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, BlockMask]]:
    """(weight name, owning module, parameter name, BlockMask) for every masked weight."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param_name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, BlockMask):
                    full = f"{module_name}.{param_name}" if module_name else param_name
                    yield full, module, param_name, p


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The mask scores: give them their own optimizer group (own lr, no weight decay)."""
    return [m.scores for _, _, _, m in iter_block_masks(model)]


def _validate_targets(found: list[Target], tiling: Tiling) -> None:
    for t in found:
        shape = t.shape
        if len(shape) != 2:
            raise ValueError(f"target {t.name} has shape {shape}: block masks need 2-D weights")
        block = tiling.stored(t.name, t.module)
        if block[0] > shape[0] or block[1] > shape[1]:
            raise ValueError(
                f"block_size {tiling.tile(t.name)} is larger than weight {t.name} {_out_in(t.module, shape)}: use a "
                "smaller block_size, a block_overrides entry for that weight, or exclude it"
            )
    unused = tiling.unused([t.name for t in found])
    if unused:
        raise ValueError(f"block_overrides pattern(s) {unused} name no targeted weight: check the names")


def _levels_of(found: list[Target], levels: Levels) -> dict[str, float]:
    """{weight name: its own sparsity} of the targets an override names; a pattern naming none is an error."""
    unused = levels.unused([t.name for t in found])
    if unused:
        raise ValueError(f"level_overrides pattern(s) {unused} name no targeted weight: check the names")
    return {t.name: lv for t in found if (lv := levels.level(t.name)) is not None}


def _levels_and_final(
    found: list[Target], overrides: Overrides | None, sparsity: float, total: bool
) -> tuple[dict[str, float], float]:
    """{weight: its override's level} and the final level of the others (`sparsity`, or with `total` what makes
    up `sparsity` of all targeted weights)."""
    levels = _levels_of(found, Levels.of(overrides))
    return levels, (_level_of_the_rest(found, levels, sparsity) if total else sparsity)


def _level_of_the_rest(found: list[Target], levels: dict[str, float], total: float) -> float:
    """The level of the weights no override names so that `total` of all targeted weights is zeroed."""
    if not levels:
        return total
    sizes = {t.name: math.prod(t.shape) for t in found}
    rest = sum(n for name, n in sizes.items() if name not in levels)
    if rest == 0:
        raise ValueError("level_total: every targeted weight has a level_overrides entry, so no weight is left to "
                         "make up sparsity; drop level_total or an override")  # fmt: skip
    level = (total * sum(sizes.values()) - sum(lv * sizes[name] for name, lv in levels.items())) / rest
    if not 0.0 < level < 1.0:
        raise ValueError(
            f"level_total: to zero {total:.1%} of all targeted weights with these level_overrides, the other weights "
            f"would need sparsity {level:.1%}: lower the overrides' levels or choose another sparsity"
        )
    return level


def _out_in(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A weight's shape as (out, in) whatever the module stores (a Conv1D stores (in, out))."""
    return tuple(shape[::-1]) if is_conv1d(module) else tuple(shape)


def _reads_weight_through_linear_only(module: nn.Module) -> bool:
    """nn.Linear / nn.MultiheadAttention with their own forward: every read of the weight goes to F.linear, which
    autocast casts to its dtype anyway, so handing it the masked weight already in that dtype changes nothing."""
    forward = type(module).forward
    return (isinstance(module, nn.Linear) and forward is nn.Linear.forward) or (
        isinstance(module, nn.MultiheadAttention) and forward is nn.MultiheadAttention.forward
    )


def _check_training_mode(score_init: str, fixed_weight: bool, fixed_mask: bool) -> None:
    if score_init not in SCORE_INITS:
        raise ValueError(f"unknown score_init {score_init!r}: use one of {SCORE_INITS}")
    if fixed_weight and fixed_mask:
        raise ValueError("fixed_weight and fixed_mask together would train nothing: choose one")


def sparsify(
    model: nn.Module,
    sparsity: float = 0.9,
    block_size: int | tuple[int, int] = 32,
    targets: Sequence[str] | str = ("mlp", "attn"),
    exclude: Sequence[str] = (),
    *,
    block_overrides: Overrides | None = None,
    level_overrides: Overrides | None = None,
    level_total: bool = False,
    skip_first_block: bool = False,
    skip_head: bool = True,
    allocation: str = "layerwise",
    min_density: float = 0.0,
    schedule: str = "constant",
    initial_sparsity: float = 0.0,
    ramp_steps: int = 0,
    start_step: int = 0,
    score_init: str = "kaiming",
    fixed_weight: bool = False,
    fixed_mask: bool = False,
    freeze_after_ramp: bool = False,
    seed: int | None = None,
    dry_run: bool = False,
) -> SparsityReport:
    """Put learned block masks on the targeted weights of `model` (in place) and return a report.

    `block_size` is (output rows, input columns) of every weight as the layer computes with it (a Conv1D's stored
    tile is the transpose); `block_overrides` gives some weights another (superblock.sparsity.tiling), and
    `level_overrides` another sparsity (`[{"match": "*.mlp.up_proj", "level": 0.3}]`: those weights ramp with the
    schedule to their own level; layerwise allocation only). With `level_total`, `sparsity` is the share of all
    targeted weights zeroed: the weights no override names make up what the overrides leave.
    Every argument is validated before the model is touched, so an error leaves it unchanged. `dry_run=True`
    returns the report without changing the model. See README for the meaning of each option.
    """
    if get_controller(model) is not None:
        raise ValueError("model is already sparsified: call fold_masks(model) first to sparsify it again")
    tiling = Tiling.of(block_size, block_overrides)
    _check_training_mode(score_init, fixed_weight, fixed_mask)
    found = select_targets(model, targets, exclude, skip_first_block=skip_first_block, skip_head=skip_head)
    _validate_targets(found, tiling)
    levels, final = _levels_and_final(found, level_overrides, check_sparsity(sparsity), level_total)
    sched = SparsitySchedule(final, schedule, initial_sparsity, start_step, ramp_steps)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    masks = [(t.name, _mask_for(t, tiling, score_init, fixed_mask, generator)) for t in found]
    freeze = sched.end_step if freeze_after_ramp else None
    controller = SparsityController(
        masks, sched, allocation=allocation, min_density=min_density, freeze_step=freeze, levels=levels
    )
    controller.refresh(force=True)
    report = SparsityReport(
        rows=[_row(t, m, tiling) for t, (_, m) in zip(found, masks, strict=True)],
        sparsity=sched.value(0) * (sparsity / final if final else 1.0),  # of all (level_total: the rest at final)
        allocation=allocation,
        dry_run=dry_run,
    )
    if dry_run:
        return report
    _install(model, found, masks, controller, fixed_weight)
    return report


def _mask_for(
    t: Target, tiling: Tiling, score_init: str, fixed_mask: bool, generator: torch.Generator | None
) -> BlockMask:
    """The mask of one target, in the tile of its stored weight."""
    weight = getattr(t.module, t.param_name)
    return BlockMask(weight, tiling.stored(t.name, t.module), score_init, fixed_mask, generator)


def _row(t: Target, m: BlockMask, tiling: Tiling) -> LayerRow:
    """The report's row of one mask, in (out, in) terms whatever the module stores."""
    return LayerRow(t.name, _out_in(t.module, m.weight_shape), tiling.tile(t.name), int(m.mask.sum()), m.n_blocks)


def _install(
    model: nn.Module,
    found: list,
    masks: list[tuple[str, BlockMask]],
    controller: SparsityController,
    fixed_weight: bool,
) -> None:
    """Register each mask as its weight's parametrization and attach the controller to the model."""
    plain = {id(t.module): type(t.module) for t in found if not parametrize.is_parametrized(t.module)}
    for t, (_, mask) in zip(found, masks, strict=True):
        mask.cast_ok = _reads_weight_through_linear_only(t.module)
        parametrize.register_parametrization(t.module, t.param_name, mask, unsafe=True)
        if fixed_weight:
            t.module.parametrizations[t.param_name].original.requires_grad_(False)
    # One class per original class and masked names, not one per module: torch.compile guards on module types.
    # Modules that carried other parametrizations before keep torch's class of their own.
    for t in {id(t.module): t for t in found}.values():
        if id(t.module) in plain:
            share_class(t.module, plain[id(t.module)])
    # A plain attribute (see SparsityController); deepcopy (EMA) copies it along with the masks it points to.
    object.__setattr__(model, CONTROLLER_ATTR, controller)
    model.register_load_state_dict_post_hook(_refresh_after_load)


def fold_masks(model: nn.Module) -> nn.Module:
    """Multiply the masks into the weights and remove all superblock machinery; returns the same model.

    Afterwards the model is a plain torchvision/timm module whose weights have zeros in whole tiles.
    """
    controller = get_controller(model)
    if controller is None:
        raise ValueError("model has no block masks to fold (was it sparsified?)")
    controller.refresh()
    for module in {id(m): m for _, m, _, _ in iter_block_masks(model)}.values():
        _unparametrize(module)
    del model.__dict__[CONTROLLER_ATTR]
    hooks = model._load_state_dict_post_hooks
    for key in [k for k, hook in hooks.items() if hook is _refresh_after_load]:
        del hooks[key]
    return model


@torch.no_grad()
def _unparametrize(module: nn.Module) -> None:
    """Replace every parametrized tensor of `module` by its current (masked) value, in its original Parameter.

    Not `parametrize.remove_parametrizations`: that deletes the property from the module's injected class, which
    other masked modules and every deepcopy (an EMA copy, a copy folded for export) share, and so would break them.
    """
    plists = module.parametrizations
    if not all(isinstance(p, BlockMask) for plist in plists.values() for p in plist):
        own_class(module)  # remove_parametrizations edits the class: on a private copy, not the shared one
        for name in list(plists):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        return
    values = {name: getattr(module, name) for name in plists}
    originals = {name: plists[name].original for name in plists}
    module.__class__ = module.__class__.__bases__[0]
    del module._modules["parametrizations"]
    for name, value in values.items():
        originals[name].copy_(value)
        module.register_parameter(name, originals[name])


@torch.no_grad()
def block_sparsity(
    model: nn.Module, block_size: int | tuple[int, int] = 32, block_overrides: Overrides | None = None
) -> dict[str, float]:
    """{weight name: fraction of all-zero tiles}, measured from the (effective) weights of every projection, in
    tiles of (out rows, in cols) as `sparsify` takes them.

    Works on masked, folded or plain models; dense weights report 0.0. Edge tiles count as tiles.
    """
    tiling = Tiling.of(block_size, block_overrides)
    result = {}
    for t in linear_weights(model):
        block = tiling.stored(t.name, t.module)
        weight = getattr(t.module, t.param_name)
        nonzero = tile_sum((weight != 0).float(), block)
        rows, cols = grid_shape(weight.shape, block)
        result[t.name] = float((nonzero == 0).sum().item()) / (rows * cols)
    return result
