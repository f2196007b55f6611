"""Image transforms: timm's ImageNet train/eval pipelines, RandAugment (timm or torchvision), normalisation
constants, and the Pillow 13 fix for timm's posterize."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _randaugment(spec: str | None, image_size: int, mean: tuple[float, ...]) -> list[Callable]:
    if not spec:
        return []
    if spec == "torchvision":
        from torchvision.transforms import RandAugment

        return [RandAugment()]
    if spec.startswith("rand"):
        from timm.data.auto_augment import rand_augment_transform

        # Same hparams as timm's training transforms: fill with the mean colour, translate up to 45%.
        hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
        return [_pillow13_safe(rand_augment_transform(spec, hparams))]
    raise ValueError(
        f"data.randaugment={spec!r} is not understood: use a timm string like 'rand-m9-mstd0.5-inc1', "
        "'torchvision', or null"
    )


def posterize_bits(img, bits_to_keep: int, **_kwargs):
    """timm's posterize, also for 0 bits: Pillow 13 refuses ``ImageOps.posterize(img, 0)``.

    timm's increasing-severity policy (``...-inc1``) asks for 0 kept bits at magnitude 10 (reached with
    ``mstd`` noise); older Pillow mapped every pixel to 0 then, so that is what 0 bits means here too.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _v: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow13_safe(transform: Callable) -> Callable:
    """Swap timm's posterize op for :func:`posterize_bits` in a timm RandAugment (module-level: picklable)."""
    from timm.data import auto_augment

    for op in getattr(transform, "ops", []):
        if getattr(op, "aug_fn", None) is auto_augment.posterize:
            op.aug_fn = posterize_bits
    return transform


AUGMENT_DEFAULTS: dict[str, Any] = {
    "scale": (0.08, 1.0),
    "ratio": (3 / 4, 4 / 3),
    "hflip": 0.5,
    "vflip": 0.0,
    "color_jitter": None,
    "re_prob": 0.0,
    "crop_pct": 0.875,
    "interpolation": "bicubic",
}
# The recipes `data.augment.recipe` names (configs/data/augment/<recipe>.yaml hold the same values) and the
# RandAugment each implies when `data.randaugment=auto`. ImageNet's (random-resized crops down to 8%, flips, a
# 0.875 eval centre crop, RandAugment) destroys small images such as digits: dense 43% where a linear classifier gets
# 96%; small images get mild crops, no flips, no centre crop and no RandAugment.
AUGMENT_RECIPES: dict[str, dict[str, Any]] = {
    "imagenet": dict(AUGMENT_DEFAULTS),
    "small": {
        "scale": (0.75, 1.0),
        "ratio": (0.85, 1.18),
        "hflip": 0.0,
        "vflip": 0.0,
        "color_jitter": None,
        "re_prob": 0.0,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    },
}
RECIPE_RANDAUGMENT: dict[str, str | None] = {"imagenet": "rand-m9-mstd0.5-inc1", "small": None}
SMALL_IMAGE_MAX = 64  # recipe=auto: images of at most this many pixels a side get the small-image recipe


def resolve_augment(
    augment: dict[str, Any] | None, randaugment: str | None, image_size: int
) -> tuple[dict[str, Any], str | None, str]:
    """(transform settings, RandAugment, a sentence saying which recipe and why) for `data.augment` at a size.

    ``augment["recipe"]``: ``auto`` takes ``small`` at ``image_size <= SMALL_IMAGE_MAX`` and ``imagenet`` above;
    absent (configs from before the key) means ``imagenet``. Fields set in ``augment`` win over the recipe's;
    ``None`` fields take the recipe's. ``randaugment="auto"`` takes the recipe's RandAugment."""
    given = dict(augment or {})
    recipe = given.pop("recipe", None) or "imagenet"
    if recipe == "auto":
        recipe = "small" if image_size <= SMALL_IMAGE_MAX else "imagenet"
        why = f"auto: image_size {image_size} {'<=' if recipe == 'small' else '>'} {SMALL_IMAGE_MAX}"
    elif recipe in AUGMENT_RECIPES:
        why = "chosen in the config"
    else:
        raise ValueError(f"data.augment.recipe={recipe!r} is not one of ['auto', *{sorted(AUGMENT_RECIPES)}]")
    unknown = set(given) - set(AUGMENT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown data.augment keys {sorted(unknown)}: use {sorted(AUGMENT_DEFAULTS)} and recipe")
    explicit = {k: v for k, v in given.items() if v is not None and v != AUGMENT_RECIPES[recipe][k]}
    settings = {**AUGMENT_RECIPES[recipe], **{k: v for k, v in given.items() if v is not None}}
    ra = RECIPE_RANDAUGMENT[recipe] if randaugment == "auto" else randaugment
    note = f"image transforms: {recipe} recipe ({why}), RandAugment {ra or 'off'}"
    if explicit:
        note += f"; set in the config: {', '.join(f'{k}={v}' for k, v in sorted(explicit.items()))}"
    return settings, ra, note


def image_transforms(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    randaugment: str | None,
    augment: dict[str, Any] | None = None,
) -> tuple[Callable, Callable]:
    """(train, eval) transforms from timm's factory; `augment` overrides :data:`AUGMENT_DEFAULTS` (ImageNet's
    recipe: random-resized crops of 8-100% of the area, horizontal flips, eval centre crop of 0.875).

    ``randaugment``: a timm string (``rand-m9-mstd0.5-inc1``), ``torchvision`` or None."""
    from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train

    unknown = set(augment or {}) - set(AUGMENT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown data.augment keys {sorted(unknown)}: use {sorted(AUGMENT_DEFAULTS)}")
    a = {**AUGMENT_DEFAULTS, **(augment or {})}
    timm_aa = randaugment if randaugment and randaugment != "torchvision" else None
    if randaugment and not (randaugment == "torchvision" or randaugment.startswith("rand")):
        _randaugment(randaugment, image_size, mean)  # raises the clear error
    train = transforms_imagenet_train(
        image_size,
        scale=tuple(a["scale"]),
        ratio=tuple(a["ratio"]),
        hflip=a["hflip"],
        vflip=a["vflip"],
        color_jitter=a["color_jitter"],
        auto_augment=timm_aa,
        interpolation=a["interpolation"],
        mean=mean,
        std=std,
        re_prob=a["re_prob"],
    )
    if randaugment == "torchvision":  # on the PIL image, before ToTensor
        at = next(i for i, t in enumerate(train.transforms) if "ToTensor" in type(t).__name__)
        train.transforms[at:at] = _randaugment(randaugment, image_size, mean)
    for t in train.transforms:
        _pillow13_safe(t)
    interp = "bicubic" if a["interpolation"] == "random" else a["interpolation"]
    val = transforms_imagenet_eval(image_size, crop_pct=a["crop_pct"], interpolation=interp, mean=mean, std=std)
    return train, val
