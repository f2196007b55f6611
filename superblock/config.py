"""Typed training config: the YAML tree under configs/ is merged into these dataclasses and checked once.

Unknown keys, wrong types and impossible values stop the run before any work with one line that says what to
change (`ConfigError`, a ValueError). Builders then receive flat keyword arguments, never the whole config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from superblock.devices import DEVICE_CHOICES, DTYPE_CHOICES
from superblock.logging import LOGGERS
from superblock.sparsity.blocks import normalize_block_size
from superblock.sparsity.mask import SCORE_INITS
from superblock.sparsity.permute import PERMUTE_MODES
from superblock.sparsity.schedule import SCHEDULES, check_sparsity
from superblock.sparsity.select import SELECTIONS
from superblock.sparsity.tiling import Levels, Tiling
from superblock.timing import BATCH_SIZES


class ConfigError(ValueError):
    """A user mistake in the configuration."""


@dataclass
class ModelConfig:
    name: str = "tiny_vit"
    source: str = "tiny"  # auto | tiny | torchvision | timm | hf (transformers)
    pretrained: str | None = None  # a local file: no hub downloads at run time
    image_size: int | None = None  # None: follow the data
    kwargs: dict[str, Any] = field(default_factory=dict)
    task: str = "auto"  # transformers models: causal_lm | sequence_classification; auto: what the data is
    config: dict[str, Any] = field(default_factory=dict)  # transformers config overrides (tiny twins: n_layer=2)


@dataclass
class AugmentConfig:
    """Image-folder transforms, built by timm's transform factory (train: random-resized crop, flips, RandAugment
    from data.randaugment, random erasing; eval: resize + centre crop). Defaults are ImageNet's; small images
    want the `data=small_images` preset (mild crops, no flips, no centre crop). recipe=auto (data=imagefolder's
    default) picks one of the two by image size (superblock.data.transforms.resolve_augment); a null field takes
    the recipe's value, a set one wins."""

    recipe: str = "imagenet"  # auto | imagenet | small
    scale: list[float] | None = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area fraction
    ratio: list[float] | None = field(default_factory=lambda: [3 / 4, 4 / 3])  # its aspect-ratio range
    hflip: float | None = 0.5
    vflip: float | None = 0.0
    color_jitter: float | None = None
    re_prob: float | None = 0.0  # random erasing
    crop_pct: float | None = 0.875  # eval: resize to size / crop_pct, centre-crop size
    interpolation: str | None = "bicubic"  # bilinear | bicubic | nearest | random


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: str | None = None
    download: bool = False
    image_size: int | None = 32  # None: the dataset's own size
    train_size: int | None = None
    val_size: int | None = None
    batch_size: int = 128
    eval_batch_size: int | None = None
    num_workers: int = 0
    randaugment: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seq_len: int = 128  # text: tokens per training sequence
    tokenizer: str | None = None  # text: a local tokenizer directory; None: the pretrained model's, else UTF-8 bytes
    max_bytes: int | None = None  # text: cap on the corpus read (None: the dataset's default)
    val_max_bytes: int | None = None  # text: cap on the validation text alone (None: its share of max_bytes)


@dataclass
class SparsityConfig:
    enabled: bool = True
    level: float = 0.8
    block_size: Any = 16  # int or [rows, cols]: output rows by input columns of every targeted weight
    block_overrides: list[Any] = field(default_factory=list)  # [{match: glob on weight / module name, block: size}]
    level_overrides: list[Any] = field(default_factory=list)  # [{match: glob, level: sparsity}]: its own final level
    level_total: bool = False  # level = the share of ALL masked weights zeroed: the others take what overrides leave
    targets: list[str] = field(default_factory=lambda: ["mlp", "attn"])
    exclude: list[str] = field(default_factory=list)
    skip_first_block: bool = False
    skip_head: bool = True
    allocation: str = "layerwise"
    min_density: float = 0.0
    schedule: str = "cubic"  # constant | linear | cubic
    initial: float = 0.0
    start_epoch: float = 0.0
    ramp_epochs: float = 0.0
    ramp_fraction: float | None = 0.5  # ramp over this fraction of all training steps (overrides ramp_epochs)
    score_init: str = "kaiming"  # kaiming | magnitude | activation (magnitude x input norms, calibrated at start)
    calibration_batches: int = 8  # score_init=activation / reconstruct: training batches that measure the inputs
    reconstruct: bool = False  # refit the kept weights to the dense outputs once the masks are chosen (step 0)
    select: str = "scores"  # scores | output_error: with reconstruct, the refit re-chooses the tiles it keeps
    fixed_weight: bool = False
    fixed_mask: bool = False
    min_recovery_steps: int = 600  # start-up notice below this many steps at the final sparsity (0: off)
    freeze_after_ramp: bool = False  # keep the masks fixed once the schedule reaches the final sparsity
    scores_lr: float | None = None  # None: the optimizer's lr
    strict_blocks: bool = False  # require block-multiple shapes (plain BSR export with no padded edge tiles)
    permute: str = "none"  # none | mlp | mlp+heads: permute hidden units so large weights share tiles


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    nesterov: bool = False
    warmup_epochs: float = 1.0
    warmup_start_factor: float = 0.01
    min_lr: float = 1e-5
    lr_schedule: str = "cosine"  # cosine | constant


@dataclass
class TrainerConfig:
    max_epochs: int = 5
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests; 0: only validate the start)
    min_steps: Any = "auto"  # int | auto | null: at least this many optimizer steps (auto: small image sets)
    accumulate_grad_batches: int = 1
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float | None = None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per transformer block: models too big for one device)
    resume: Any = False  # false | true (this run dir) | path to a run dir or checkpoint
    checkpoint_every_steps: int = 0  # 0: at the end of every epoch only
    log_every_steps: int = 10
    val_every_epochs: int = 1
    progress_every_s: float = 30.0  # stderr not a terminal: a progress line per epoch, at most one per this often
    threads: int | None = None  # torch CPU threads; None: torch's default
    fused_mask: bool = True  # eager CUDA: fused Triton kernels for masked weights; false: the plain PyTorch path
    fault_at_step: int | None = None  # resume drills and tests: SIGKILL the process right after this optimizer step


@dataclass
class DistillConfig:
    """Knowledge distillation from a dense teacher (a run dir, a checkpoint, an export dir or a weights file)."""

    teacher: str | None = None  # null: no distillation
    alpha: float = 0.5  # loss = (1 - alpha) * task loss + alpha * distillation loss
    temperature: float = 2.0  # soft targets: KL(softmax(t / T) || softmax(s / T)) * T^2
    hard: bool = False  # true: cross-entropy with the teacher's argmax instead of soft targets
    blocks: float = 0.0  # weight of the layer-wise term: each block's output against the teacher's (MSE / variance)


@dataclass
class LoggerConfig:
    name: str = "console"  # console | wandb (console + metrics.jsonl are always on)
    project: str = "superblock"
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; None: $WANDB_MODE, else online
    tags: list[str] = field(default_factory=list)


@dataclass
class MeasureConfig:
    """After training: export the run, then time the sparse model vs dense -> <run dir>/eval.json (speed next to
    accuracy in every job of a sweep)."""

    enabled: bool = False
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    batch_size: int = 64
    layout: str = "auto"  # export layout: auto | bsr | dense


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    run_dir: str | None = None  # default: Hydra's output dir
    meta: dict[str, Any] = field(default_factory=dict)  # free-form notes (experiment name, expected result)


@dataclass
class KernelsConfig:
    """`kernels.*` of export.py / evaluate.py: superblock.kernels.tuning.configure."""

    tune: bool = True  # false: `auto` measures nothing and takes built-in defaults
    cache_dir: str | None = None  # where the tuning table lives; None: ~/.cache/superblock


@dataclass
class ExportConfig:
    """`python export.py` (configs/export.yaml): the keyword arguments of superblock.export.export_checkpoint."""

    checkpoint: str = MISSING  # run directory (its checkpoints/last.pt) or a checkpoint file
    output: str | None = None  # None: exports/<run dir name>
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    layout: str = "auto"  # auto | bsr | dense
    device: str = "auto"  # auto | cpu | cuda[:i]
    batch_sizes: Any = field(default_factory=lambda: list(BATCH_SIZES))  # a list of batch sizes, or one int
    runtime: str = "eager"  # eager | compile | cudagraph
    batch_size: int | None = None  # older spelling of one batch size: batch_size=N is batch_sizes=[N]
    backend: str = "auto"  # auto | triton | torch | dense
    probe_batch: int = 4
    probe_seed: int = 0
    tolerance: float | None = None  # None: the dtype's tolerance
    use_ema: bool = False
    overwrite: bool = False
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


@dataclass
class LatencyConfig:
    """evaluate.py's latency measurement (`latency.*`)."""

    enabled: bool = True
    batch_size: int = 64  # inputs per timed batch
    warmup: int = 3
    repeats: int = 30  # timed batches per model, split over `rounds` interleaved rounds
    rounds: int = 3
    inputs: int = 4  # distinct random batches, rotated


# evaluate.py's `data:` node: null keys keep the run's own data config; any DataConfig key may be set.
EVAL_DATA_KEYS = (
    "name",
    "root",
    "download",
    "image_size",
    "train_size",
    "val_size",
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "randaugment",
    "seq_len",
    "tokenizer",
)


@dataclass
class EvaluateConfig:
    """`python evaluate.py` (configs/evaluate.yaml): the keyword arguments of superblock.evaluate.evaluate."""

    checkpoint: str = MISSING  # run directory, checkpoint file, or export directory
    mode: str = "all"  # masked | folded | bsr | all
    device: str = "auto"  # auto | cpu | cuda[:i]
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    backend: str = "auto"  # auto | triton | torch | dense
    runtime: str = "eager"  # eager | compile | cudagraph
    batch_sizes: Any = None  # runtime batch sizes; None: latency.batch_size and the eval batch size
    use_ema: bool = False
    batch_size: int | None = None  # eval batch size; None: the run's
    max_batches: int | None = None
    accuracy: bool = True
    output: str | None = None  # eval.json path; None: <run or export dir>/eval.json
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    data: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(EVAL_DATA_KEYS))  # overrides of the run's


PRECISIONS = DTYPE_CHOICES  # auto | fp32 | bf16 | fp16 (superblock.devices says what auto means)
DEVICES = DEVICE_CHOICES  # auto | cpu | cuda
OPTIMIZERS = ("adamw", "sgd")
WANDB_MODES = ("online", "offline", "disabled")
MODEL_SOURCES = ("auto", "tiny", "torchvision", "timm", "hf")
MODEL_TASKS = ("auto", "causal_lm", "sequence_classification")
T = TypeVar("T")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


def _typed(schema: type[T], cfg: DictConfig | dict, precheck: Callable[[DictConfig], None] | None = None) -> T:
    """`cfg` (without its hydra node) merged into the dataclass `schema`: unknown keys, wrong types and unset
    mandatory values become one ConfigError line. `precheck` sees the merged node first (clearer messages)."""
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]) if "hydra" in raw else raw
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        if precheck is not None:
            precheck(merged)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", "") or "a value"
        raise ConfigError(f"missing value for {key}: set it on the command line, e.g. {key}=...") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "")
        raise ConfigError(f"bad config{f' at {key}' if key else ''}: {_first_line(err)}") from None


def _data_root_given(merged: DictConfig) -> None:
    if merged.data.name == "imagefolder" and not merged.data.root:
        raise ConfigError("data.root is required for data=imagefolder: pass data.root=/path/with/train/and/val")


def to_config(cfg: DictConfig | dict) -> TrainConfig:
    """Merge a composed config into the schema and check it; ConfigError with one actionable line otherwise."""
    conf = _typed(TrainConfig, cfg, _data_root_given)
    check(conf)
    if conf.data.name == "text" and conf.data.tokenizer is None:
        conf.data.tokenizer = model_tokenizer(conf.model)
    return conf


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_tokenizer(m: ModelConfig) -> str | None:
    """The tokenizer a pretrained transformers model came with: the directory of `model.pretrained`, else of
    `model.name=hf:<dir>`, when it holds tokenizer files. None (UTF-8 bytes) for models trained from scratch."""
    return tokenizer_of(m.name, m.pretrained)


def tokenizer_of(name: str, pretrained: str | None) -> str | None:
    """model_tokenizer for a model named `name` (a model spec's or a config's) built from `pretrained`: training
    reads text with it, and evaluation of the run or its export reads the same tokens."""
    candidates = [pretrained] if pretrained else []
    if name.startswith("hf:"):
        candidates.append(name[3:])
    for c in candidates:
        path = Path(str(c)).expanduser()
        if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
            return str(path)
    return None


def _one_of(value: Any, options: tuple, key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {list(options)}")


def _positive(value: float | int | None, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check(c: TrainConfig) -> None:
    """Cross-field checks that a schema cannot express."""
    _one_of(c.model.source, MODEL_SOURCES, "model.source")
    _one_of(c.model.task, MODEL_TASKS, "model.task")
    _check_text(c)
    s = c.sparsity
    if s.enabled:
        try:
            check_sparsity(s.level, "sparsity.level")
            check_sparsity(s.initial, "sparsity.initial")
            normalize_block_size(s.block_size)
            Tiling.of(s.block_size, s.block_overrides)
            Levels.of(s.level_overrides)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if s.level_overrides and s.allocation == "global":
            raise ConfigError("sparsity.level_overrides need sparsity.allocation=layerwise (a global allocation ranks "
                              "every tile of the model against one budget)")  # fmt: skip
        if s.level_overrides and s.level <= 0.0:
            raise ConfigError("sparsity.level_overrides scale the ramp to sparsity.level: set sparsity.level > 0")
        _one_of(s.schedule, SCHEDULES, "sparsity.schedule")
        _one_of(s.allocation, ("layerwise", "global"), "sparsity.allocation")
        _one_of(s.score_init, SCORE_INITS, "sparsity.score_init")
        _positive(s.calibration_batches, "sparsity.calibration_batches")
        if s.score_init == "activation" and c.trainer.strategy == "fsdp":
            raise ConfigError("sparsity.score_init=activation calibrates whole weights: use trainer.strategy=ddp")
        _check_reconstruct(s, c.trainer)
        if s.ramp_fraction is not None and not 0.0 < s.ramp_fraction <= 1.0:
            raise ConfigError(f"sparsity.ramp_fraction must be in (0, 1] or null, got {s.ramp_fraction}")
        if s.schedule != "constant" and s.ramp_epochs <= 0 and s.ramp_fraction is None:
            raise ConfigError(f"sparsity.schedule={s.schedule} needs sparsity.ramp_epochs > 0 or a ramp_fraction")
        if s.fixed_weight and s.fixed_mask:
            raise ConfigError("sparsity.fixed_weight and sparsity.fixed_mask together train nothing: choose one")
        if not s.targets:
            raise ConfigError("sparsity.targets is empty: e.g. sparsity.targets=[mlp,attn]")
        _positive(s.scores_lr, "sparsity.scores_lr")
        _check_permute(s, c.trainer)
    _one_of(c.optim.name, OPTIMIZERS, "optim.name")
    _one_of(c.optim.lr_schedule, ("cosine", "constant"), "optim.lr_schedule")
    _positive(c.optim.lr, "optim.lr")
    _positive(c.optim.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(c.optim.warmup_epochs, "optim.warmup_epochs", allow_zero=True)
    _check_trainer(c.trainer)
    _positive(c.data.batch_size, "data.batch_size")
    _positive(c.data.num_workers, "data.num_workers", allow_zero=True)
    _check_augment(c.data.augment)
    if not 0.0 <= c.distill.alpha <= 1.0:
        raise ConfigError(f"distill.alpha must be in [0, 1], got {c.distill.alpha}")
    _positive(c.distill.temperature, "distill.temperature")
    _positive(c.distill.blocks, "distill.blocks", allow_zero=True)
    if c.distill.blocks > 0 and not c.distill.teacher:
        raise ConfigError("distill.blocks > 0 pulls each block toward a teacher's: set distill.teacher")
    _one_of(c.logger.name, LOGGERS, "logger.name")
    if c.logger.mode is not None:
        _one_of(c.logger.mode, WANDB_MODES, "logger.mode")
    _one_of(c.measure.dtype, DTYPE_CHOICES, "measure.dtype")
    _one_of(c.measure.layout, ("auto", "bsr", "dense"), "measure.layout")
    _positive(c.measure.batch_size, "measure.batch_size")


def _check_reconstruct(s: SparsityConfig, t: TrainerConfig) -> None:
    """sparsity.reconstruct refits the weights to the masks of step 0: those must be the final ones."""
    _one_of(s.select, SELECTIONS, "sparsity.select")  # only read with reconstruct: the refit is what selects
    if not s.reconstruct:
        return
    if s.schedule != "constant" or s.start_epoch > 0:
        raise ConfigError(
            "sparsity.reconstruct refits the weights to the masks chosen before the first step, so the masks must be "
            "at the final sparsity from step 0: set sparsity.schedule=constant and sparsity.start_epoch=0 (the "
            "recipe sparsity=oneshot does), or leave sparsity.reconstruct=false"
        )
    if t.strategy == "fsdp":
        raise ConfigError("sparsity.reconstruct refits whole weights: use trainer.strategy=ddp")


def _check_trainer(t: TrainerConfig) -> None:
    _positive(t.max_epochs, "trainer.max_epochs")
    _positive(t.max_steps, "trainer.max_steps", allow_zero=True)
    if t.min_steps != "auto":
        if isinstance(t.min_steps, (str, bool)):
            raise ConfigError(f"trainer.min_steps is a number of steps, auto or null, got {t.min_steps!r}")
        _positive(t.min_steps, "trainer.min_steps")
    _positive(t.accumulate_grad_batches, "trainer.accumulate_grad_batches")
    _positive(t.grad_clip, "trainer.grad_clip")
    _positive(t.log_every_steps, "trainer.log_every_steps")
    _positive(t.val_every_epochs, "trainer.val_every_epochs")
    _positive(t.progress_every_s, "trainer.progress_every_s", allow_zero=True)
    _positive(t.checkpoint_every_steps, "trainer.checkpoint_every_steps", allow_zero=True)
    _positive(t.fault_at_step, "trainer.fault_at_step")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ConfigError(f"trainer.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"trainer.ema_decay must be in (0, 1) or null, got {t.ema_decay}")
    _positive(t.mixup, "trainer.mixup", allow_zero=True)
    _positive(t.cutmix, "trainer.cutmix", allow_zero=True)
    _one_of(t.precision, PRECISIONS, "trainer.precision")
    _one_of(t.device, DEVICES, "trainer.device")
    _one_of(t.strategy, ("ddp", "fsdp"), "trainer.strategy")
    if t.strategy == "fsdp" and t.ema_decay:
        raise ConfigError(
            "trainer.ema_decay with trainer.strategy=fsdp is not supported: a whole EMA copy on every "
            "rank defeats sharding; set trainer.ema_decay=null"
        )


def _check_text(c: TrainConfig) -> None:
    """Text data feeds token ids: only a transformers model reads them, and mixup/cutmix mean nothing there."""
    hf = c.model.source == "hf" or c.model.name.startswith("hf:")
    if c.data.name == "text" and not hf:
        raise ConfigError(f"data=text needs a language model: use model=hf (got model.name={c.model.name!r})")
    if hf and c.data.name != "text" and c.model.task == "causal_lm":
        raise ConfigError(f"model.task=causal_lm trains on token streams: use data=text (got data={c.data.name})")
    if c.data.name == "text" and (c.trainer.mixup > 0 or c.trainer.cutmix > 0):
        raise ConfigError("trainer.mixup / trainer.cutmix mix images: set them to 0 for data=text")
    _positive(c.data.seq_len, "data.seq_len")
    _positive(c.data.max_bytes, "data.max_bytes")
    _positive(c.data.val_max_bytes, "data.val_max_bytes")


def _check_permute(s: SparsityConfig, t: TrainerConfig) -> None:
    _one_of(s.permute, PERMUTE_MODES, "sparsity.permute")
    if s.permute == "none":
        return
    if t.strategy == "fsdp":
        raise ConfigError(
            f"sparsity.permute={s.permute} permutes whole weights, which FSDP shards: use "
            "trainer.strategy=ddp or sparsity.permute=none"
        )


def _check_augment(a: AugmentConfig) -> None:
    _one_of(a.recipe, ("auto", "imagenet", "small"), "data.augment.recipe")
    for key, pair in (("scale", a.scale), ("ratio", a.ratio)):  # null: the recipe's value
        if pair is not None and (len(pair) != 2 or not 0 < pair[0] <= pair[1]):
            raise ConfigError(f"data.augment.{key} must be [low, high] with 0 < low <= high, got {list(pair)}")
    if a.scale is not None and a.scale[1] > 1:
        raise ConfigError(f"data.augment.scale is a fraction of the image area: at most 1, got {list(a.scale)}")
    for key in ("hflip", "vflip", "re_prob"):
        if getattr(a, key) is not None and not 0.0 <= getattr(a, key) <= 1.0:
            raise ConfigError(f"data.augment.{key} is a probability in [0, 1], got {getattr(a, key)}")
    if a.crop_pct is not None and not 0.0 < a.crop_pct <= 1.0:
        raise ConfigError(f"data.augment.crop_pct must be in (0, 1], got {a.crop_pct}")
    if a.interpolation is not None:
        _one_of(a.interpolation, ("bilinear", "bicubic", "nearest", "random"), "data.augment.interpolation")


def check_strict_blocks(tiles: dict[str, tuple[tuple[int, ...], tuple[int, int]]]) -> None:
    """With sparsity.strict_blocks, every targeted weight must be a whole number of its tiles.
    `tiles`: {weight name: ((out, in) shape, (out rows, in cols) tile)}."""
    bad = [f"{n} {tuple(s)} in {list(b)} tiles" for n, (s, b) in tiles.items() if s[0] % b[0] or s[1] % b[1]]
    if bad:
        raise ConfigError(
            f"the block size does not divide {len(bad)} targeted weight(s), e.g. {bad[0]}: choose a "
            "sparsity.block_size that divides them, give them another in sparsity.block_overrides (e.g. "
            "'sparsity.block_overrides=[{match:\"*.attn.proj\",block:[32,32]}]'), exclude them, or set "
            "sparsity.strict_blocks=false"
        )


def _checkpoint_given(merged: DictConfig) -> None:
    if OmegaConf.is_missing(merged, "checkpoint") or merged.checkpoint in (None, ""):
        raise ConfigError("checkpoint=<path> is required, e.g. checkpoint=outputs/<run dir>")


def _check_backend(backend: str) -> None:
    from superblock.kernels.bsr_linear import BACKENDS  # lazily: training never needs the kernels' names

    _one_of(backend, BACKENDS, "backend")


def to_export_config(cfg: DictConfig | dict) -> ExportConfig:
    """export.py's config, typed and checked; ConfigError with one actionable line otherwise. Layout, runtime,
    dtype, device, batch sizes and the probe are checked by export_checkpoint itself, first thing."""
    conf = _typed(ExportConfig, cfg, _checkpoint_given)
    _check_backend(conf.backend)
    return conf


def to_evaluate_config(cfg: DictConfig | dict) -> EvaluateConfig:
    """evaluate.py's config, typed and checked; ConfigError with one actionable line otherwise. Mode, runtime,
    dtype, device and runtime batch sizes are checked by evaluate itself, first thing."""
    conf = _typed(EvaluateConfig, cfg, _checkpoint_given)
    _check_backend(conf.backend)
    _positive(conf.batch_size, "batch_size")
    _positive(conf.max_batches, "max_batches")
    for key in ("batch_size", "repeats", "rounds", "inputs"):
        _positive(getattr(conf.latency, key), f"latency.{key}")
    _positive(conf.latency.warmup, "latency.warmup", allow_zero=True)
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(conf.data) - known)
    if unknown:
        raise ConfigError(f"data.{unknown[0]} is not a data option: use one of {sorted(known)}")
    return conf
