"""Accuracy of sparse recipes next to dense, as a grid of real training runs: one row per run and a summary table.

The grid is recipe x permutation x block size x sparsity x seed, plus one dense run per seed. Every job is a real
`python train.py` run (run dir kept under <out>/runs/<name>, its console output in stdout.log there); --parallel N
runs N at once (several fit on one GPU: --device cuda). A run whose summary.json exists is read, not run again, so
a cut-short grid continues where it stopped.

    # the frontier on one H200 (a ~8-minute device call): digits, wider ViT, 3 recipes x permutation on/off
    python benchmarks/accuracy.py --preset digits_wide --root data/digits --device cuda --parallel 12 \\
        --recipes reference,default,magnitude_frozen --permute none,mlp+heads --blocks 16,32,64 \\
        --levels 0.8,0.9 --seeds 0,1,2 --epochs 30 --budget-minutes 8 --out docs/frontier/digits_wide
    # the LM testbed (perplexity per byte; fewer steps per run to fit the budget)
    python benchmarks/accuracy.py --preset lm_small --device cuda --parallel 6 --recipes reference,default \\
        --permute none,mlp+heads --blocks 32,64 --levels 0.8 --seeds 0 --max-steps 1500 --budget-minutes 8 \\
        --out docs/frontier/lm_small
    # a pretrained language model (SmolLM2-135M, converted by scripts/pretrained/smollm2.py): as is, dense
    # fine-tune, and the experiment's own recipe (one-shot refit) against the reference at 50% / 70%
    python benchmarks/accuracy.py --preset smollm2 --device cuda --parallel 6 --as-is \
        --recipes experiment,reference --blocks 16,32,64,64x16 --levels 0.5,0.7 --seeds 0,1,2 \
        --out docs/frontier/smollm2
    # the same students distilled from the grid's own dense fine-tune of their seed instead of the pretrained model
    python benchmarks/accuracy.py --preset smollm2 --device cuda --parallel 6 --teacher dense \
        --recipes experiment --blocks 64x16 --levels 0.5,0.7 --seeds 0,1,2 --out docs/frontier/smollm2
    python benchmarks/accuracy.py ... --dry-run       # the job list and the grid's size; nothing runs
    # the older digits table (docs/results.md): tiny_vit, blocks 8 / 16, with the fine-tune + KD recipe
    python benchmarks/accuracy.py --data digits --root data/digits --epochs 30 --jobs 2 --threads 1 --out <dir> \\
        --recipes reference,default,finetune --blocks 8,16

Budget: with --budget-minutes M no run starts once the runs so far say it would not end within M minutes of the
start, and runs still going at M minutes are stopped (their rows say so, with the last validation they logged);
dense runs are queued first, then the sparse runs seed by seed, all at once (only a run that needs its seed's dense
run waits for it: the finetune recipe, or any with --teacher dense), so a cut grid still has every configuration at
its first seed. Without a budget it runs all.
Writes <out>/runs.jsonl (a row per run, as each ends: the metric's last and best validation), runs.csv, results.md
(mean +- std over seeds of the metric and of its gap to the same seed's dense run; for perplexities also the gap in
percent of dense and the perplexity per byte of text), results.json and accuracy.png. `--as-is` adds one run that
trains nothing (trainer.max_steps=0): the starting model's own metric, for presets that start from a pretrained
model.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from superblock.report.curves import read_curve
from superblock.rundir import SUMMARY

ROOT = Path(__file__).resolve().parents[1]
# Data / model presets: train.py overrides ({root}: --root) and the metric read from summary.json.
PRESETS = {
    "digits": (["data=small_images", "data.root={root}", "data.image_size=16"], "val_top1"),
    # any ImageFolder tree the way a user trains it: data=imagefolder (augment=auto, its default batch); pass
    # data.image_size=N after the options
    "imagefolder": (["data=imagefolder", "data.root={root}"], "val_top1"),
    "synthetic": (["data=synthetic"], "val_top1"),
    "digits_wide": (["experiment=digits_wide", "data.root={root}"], "val_top1"),
    "lm_tiny": (["experiment=lm_tiny"], "val_perplexity"),
    "lm_small": (["experiment=lm_small"], "val_perplexity"),
    # a pretrained language model; --root is the transformers folder scripts/pretrained/smollm2.py writes
    "smollm2": (["experiment=smollm2_sparse", "model.pretrained={root}"], "val_perplexity"),
}
DEFAULT_ROOTS = {"smollm2": "pretrained/smollm2-135m-instruct"}  # the others: data/digits
# a preset's dense runs at their own settings: the dense SmolLM2 fine-tune is best at lr 1e-4, its sparse runs at the
# experiment's 3e-4 (docs/frontier.md, "The refit chooses its tiles")
DENSE_OVERRIDES = {"smollm2": ["optim.lr=1e-4"]}
# a second metric recorded beside the first where runs report it (perplexity per byte compares across tokenizers)
ALSO = {"val_perplexity": "val_perplexity_per_byte"}
RECIPES = {
    # the reference recipe, whatever an experiment preset sets for its own: no ramp, no frozen masks, one level for
    # every weight (the other recipes keep a preset's per-layer levels, e.g. smollm2's dense layers 0-1)
    "reference": [
        "sparsity=supermask_reference",
        "sparsity.ramp_fraction=null",
        "sparsity.freeze_after_ramp=false",
        "sparsity.level_overrides=[]",
        "sparsity.level_total=false",
    ],
    "default": ["sparsity=learned"],
    "magnitude_init": ["sparsity=learned", "sparsity.score_init=magnitude"],  # learned scores, magnitude start
    "magnitude_frozen": ["sparsity=magnitude_frozen"],
    # an experiment preset's own recipe with activation-aware scores (pretrained language models; it keeps the
    # preset's per-layer levels: smollm2's first two layers dense)
    "activation_init": ["sparsity.score_init=activation"],
    # one-shot activation-aware masks at the final level, kept weights refit to the dense outputs, then the fine-tune
    # with the masks fixed (sparsity=oneshot; pretrained models: docs/frontier.md, "A pretrained language model")
    "oneshot": ["sparsity=oneshot"],
    # magnitude-initialised scores ramped over the first half of the run, masks frozen after it (the smollm2
    # preset's recipe before the refit: docs/frontier.md, "The fine-tune from the one-shot refit")
    "magnitude_ramp": ["sparsity=finetune", "sparsity.ramp_fraction=0.5", "sparsity.freeze_after_ramp=true"],
    "finetune": ["experiment=sparse_finetune"],  # + model.pretrained / distill.teacher = that seed's dense run
    "experiment": [],  # an experiment preset's own sparse recipe, as the experiment file sets it
}
PERMUTE_TAGS = {"none": "p0", "mlp": "pm", "mlp+heads": "pmh"}
_PERMUTATION_LINE = re.compile(r"kept magnitude ([0-9.]+) -> ([0-9.]+)")


def _csv(cast):
    return lambda text: [cast(v) for v in text.split(",") if v]


def block_label(text: str | int) -> str:
    """A tile as the grid names it: "32" for a square (from "32" or "32x32"), "64x16" for 64 output rows by 16
    input columns. ValueError (argparse's message) for anything else."""
    parts = str(text).lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a block is N or ROWSxCOLS (e.g. 32 or 64x16), got {text!r}")
    rows, cols = int(parts[0]), int(parts[-1])
    return str(rows) if rows == cols else f"{rows}x{cols}"


def block_shape(label: str | int | None) -> tuple[int, int] | None:
    """(rows, cols) of a block label (None for a dense run)."""
    if label is None:
        return None
    parts = str(label).split("x")
    return int(parts[0]), int(parts[-1])


def _block_order(label: str | int | None) -> tuple[int, int]:
    """Sort tiles by area, then taller first; a dense run (no tile) first."""
    shape = block_shape(label)
    return (0, 0) if shape is None else (shape[0] * shape[1], -shape[0])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", "--data", dest="preset", choices=sorted(PRESETS), default="digits")
    p.add_argument(
        "--root",
        default=None,
        help="the image tree of the digits presets (written if missing; default data/digits), or the model folder of "
        f"a pretrained preset (default {DEFAULT_ROOTS})",
    )
    p.add_argument(
        "--recipes",
        type=_csv(str),
        default=["reference", "default", "magnitude_frozen"],
        help=f"comma-separated, of {sorted(RECIPES)}",
    )
    p.add_argument(
        "--permute",
        type=_csv(str),
        default=None,
        help="comma-separated: none,mlp,mlp+heads (default: the preset's own, e.g. smollm2's mlp; none for the others)",
    )
    p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
    p.add_argument("--levels", type=_csv(float), default=[0.8, 0.9])
    p.add_argument(
        "--blocks",
        type=_csv(block_label),
        default=["16", "32", "64"],
        help="tiles, comma-separated: N for N x N, ROWSxCOLS for ROWS output rows by COLS inputs (e.g. 32,64x16)",
    )
    p.add_argument(
        "--epochs",
        type=_csv(int),
        default=None,
        help="trainer.max_epochs, comma-separated: a run-length axis (each value gets its own dense runs)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="trainer.max_steps of every run")
    p.add_argument(
        "--start-epoch",
        type=float,
        default=None,
        help="sparsity.start_epoch of every sparse run: a dense warm-up before the ramp (and the moment a "
        "permutation happens)",
    )
    p.add_argument("--parallel", "--jobs", dest="parallel", type=int, default=1, help="runs at once")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--budget-minutes", type=float, default=None)
    p.add_argument(
        "--as-is", action="store_true", help="one more run that trains nothing: the starting model's own metric"
    )
    p.add_argument(
        "--teacher",
        choices=("preset", "dense"),
        default="preset",
        help="preset: the distillation the recipe and preset set (smollm2: the pretrained model); dense: every sparse "
        "run distils from the same seed's dense run of this grid (it starts once that run has ended)",
    )
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default="docs/results")
    p.add_argument("extra", nargs="*", help="more train.py overrides for every run")
    args = p.parse_args(argv)
    args.permute = args.permute or [preset_permutation(args.preset)]
    bad = sorted(set(args.recipes) - set(RECIPES)) + sorted(set(args.permute) - set(PERMUTE_TAGS))
    if bad:
        p.error(f"unknown recipe / permutation {bad}: recipes {sorted(RECIPES)}, permutations {sorted(PERMUTE_TAGS)}")
    experiment = PRESETS[args.preset][0][0].startswith("experiment=")
    if "finetune" in args.recipes and experiment:
        p.error(f"--recipes finetune is experiment=sparse_finetune: it cannot be combined with --preset {args.preset}")
    if "experiment" in args.recipes and not experiment:
        p.error(f"--recipes experiment runs an experiment preset's own recipe; --preset {args.preset} has none")
    # train.py runs in the repository: a relative root is the caller's, made absolute
    args.root = str(Path(args.root or DEFAULT_ROOTS.get(args.preset, "data/digits")).resolve())
    return args


def preset_permutation(preset: str) -> str:
    """The sparsity.permute an experiment preset sets in its own file (configs/experiment/<name>.yaml), else "none":
    a grid that does not pass --permute runs the experiment's recipe as it is, permutation included."""
    from omegaconf import OmegaConf

    first = PRESETS[preset][0][0]
    if not first.startswith("experiment="):
        return "none"
    cfg = OmegaConf.load(ROOT / "configs" / "experiment" / f"{first.split('=', 1)[1]}.yaml")
    return str(OmegaConf.select(cfg, "sparsity.permute", default="none"))


# -------------------------------------------------------------------------------------------------------- jobs


def jobs_for(args: argparse.Namespace) -> list[dict]:
    """Dense runs first (one per seed and run length), then the sparse grid seed by seed."""
    out = Path(args.out).resolve()
    lengths = args.epochs or [None]
    jobs = [
        {
            "name": f"dense{_length_tag(args, e)}_s{s}",
            "recipe": "dense",
            "permute": "none",
            "level": 0.0,
            "block": None,
            "epochs": e,
            "seed": s,
            "overrides": ["sparsity=none", *DENSE_OVERRIDES.get(args.preset, []), *_length(e)],
        }
        for s in args.seeds
        for e in lengths
    ]
    if args.as_is:  # the starting model, measured once: no step, so no seed or run length changes it
        jobs.append({**jobs[0], "name": "as_is", "recipe": "as_is", "epochs": None, "seed": args.seeds[0],
                     "overrides": ["sparsity=none", "trainer.max_steps=0"]})  # fmt: skip
    for seed in args.seeds:
        for epochs in lengths:
            for level in args.levels:
                for block in args.blocks:
                    for recipe in args.recipes:
                        for permute in args.permute:
                            jobs.append(_sparse_job(args, out, recipe, permute, level, block, seed, epochs))
    return jobs


def _length(epochs: int | None) -> list[str]:
    """A run-length axis trains exactly the epochs asked (no trainer.min_steps=auto floor on small sets)."""
    return [] if epochs is None else [f"trainer.max_epochs={epochs}", "trainer.min_steps=null"]


def _length_tag(args: argparse.Namespace, epochs: int | None) -> str:
    """_e<epochs> in run names only on a run-length axis (several --epochs): older grids keep their names."""
    return f"_e{epochs}" if epochs is not None and len(args.epochs or []) > 1 else ""


def _sparse_job(args, out: Path, recipe: str, permute: str, level: float, block: str, seed: int,
                epochs: int | None = None) -> dict:  # fmt: skip
    rows, cols = block_shape(block)
    size = str(rows) if rows == cols else f"[{rows},{cols}]"
    extra = [f"sparsity.level={level}", f"sparsity.block_size={size}", f"sparsity.permute={permute}"]
    if args.start_epoch is not None:
        extra.append(f"sparsity.start_epoch={args.start_epoch}")
    dense = out / "runs" / f"dense{_length_tag(args, epochs)}_s{seed}"
    after, label, tag = None, recipe, ""
    if recipe == "finetune":  # starts from that dense run (sparse_finetune distils from its start)
        extra.append(f"model.pretrained={dense}")
        after = dense.name
    elif args.teacher == "dense":
        extra.append(f"distill.teacher={dense}")
        after, label, tag = dense.name, f"{recipe}+dense_teacher", "_tdense"
    name = f"{recipe}{tag}_{PERMUTE_TAGS[permute]}_l{level}_b{block}{_length_tag(args, epochs)}_s{seed}"
    return {
        "name": name,
        "recipe": label,
        "after": after,
        "permute": permute,
        "level": level,
        "block": block,
        "epochs": epochs,
        "seed": seed,
        "overrides": [*RECIPES[recipe], *extra, *_length(epochs)],
    }


def command(job: dict, args: argparse.Namespace) -> list[str]:
    data, _ = PRESETS[args.preset]
    run_dir = Path(args.out).resolve() / "runs" / job["name"]
    cmd = [
        sys.executable,
        "train.py",
        *(o.format(root=args.root) for o in data),
        *job["overrides"],
        f"seed={job['seed']}",
        f"trainer.threads={args.threads}",
        f"trainer.device={args.device}",
        f"hydra.run.dir={run_dir}",
    ]
    if args.max_steps is not None and job["recipe"] != "as_is":
        cmd.append(f"trainer.max_steps={args.max_steps}")
    return [*cmd, *args.extra]


class Budget:
    """When to stop starting runs (and stop running ones): --budget-minutes from the start of the grid."""

    def __init__(self, minutes: float | None) -> None:
        self.start = time.time()
        self.deadline = None if minutes is None else self.start + 60 * minutes
        self.walls: list[float] = []
        self.lock = threading.Lock()

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def can_start(self) -> bool:
        left = self.left()
        with self.lock:
            typical = statistics.median(self.walls) if self.walls else 0.0
        return left is None or left > typical

    def finished(self, wall: float) -> None:
        with self.lock:
            self.walls.append(wall)


def run(job: dict, args: argparse.Namespace, budget: Budget) -> dict:
    """One training run (or the summary it already left): the row it adds to runs.jsonl."""
    _, metric = PRESETS[args.preset]
    run_dir = Path(args.out).resolve() / "runs" / job["name"]
    row = {k: v for k, v in job.items() if k not in ("overrides", "after")}
    row |= {"metric": metric, "value": None, "status": "ok"}
    summary = run_dir / SUMMARY
    if not summary.exists():
        if not budget.can_start():
            return {**row, "status": "skipped (budget)"}
        row["status"] = _train(job, args, budget, run_dir)
    if summary.exists():
        s = json.loads(summary.read_text())
        if s.get("status") == "failed":  # train.py's failure summary: say why, keep no value
            row["status"] = f"failed: {str(s.get('error'))[:200]}"
            print(f"{row['status']:>18} {job['name']}", flush=True)
            return row
        row.update(value=s.get(metric), wall_time_s=s.get("wall_time_s"), status="ok")
        if s.get(ALSO.get(metric, "")) is not None:
            row["also"] = s[ALSO[metric]]
        if s.get(f"best_{metric}") is not None:  # the best validation's (runs that peak before their end)
            row["best"] = s[f"best_{metric}"]
        row.update(_permutation(run_dir))
    print(f"{row['status']:>18} {job['name']}: {metric} {row['value']}", flush=True)
    return row


def _train(job: dict, args: argparse.Namespace, budget: Budget, run_dir: Path) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    start, left = time.time(), budget.left()
    with open(run_dir / "stdout.log", "w") as log:
        try:
            proc = subprocess.run(
                command(job, args),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=None if left is None else max(1.0, left),
            )
        except subprocess.TimeoutExpired:
            return "killed (budget)" + last_validation(run_dir, PRESETS[args.preset][1])
    budget.finished(time.time() - start)
    if proc.returncode != 0:
        tail = (run_dir / "stdout.log").read_text().strip().splitlines()[-1:]
        return f"failed ({proc.returncode}): {tail}"
    return "ok"


def last_validation(run_dir: Path, metric: str) -> str:
    """' at step N: <metric> V' from the last (finite) validation a stopped run logged (its metrics.jsonl, read by
    the report's read_curve), or '': how far a run the budget cut had got, said in its status; its value stays empty,
    since it is not the run's result."""
    curve = read_curve(run_dir, metric)
    if not curve:
        return ""
    step, value = curve[-1]
    return f" at step {step}: {metric} {value:.4g}"


def _permutation(run_dir: Path) -> dict:
    """Kept magnitude before / after the permutation, from the run's console output (when it permuted)."""
    log = run_dir / "stdout.log"
    match = _PERMUTATION_LINE.search(log.read_text()) if log.exists() else None
    return {"kept_before": float(match[1]), "kept_after": float(match[2])} if match else {}


# ------------------------------------------------------------------------------------------------------ tables


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per configuration: metric and gap to the same seed's dense run, mean and std over seeds."""

    def at(r):  # the run length a row was trained for (None: the preset's)
        return r.get("epochs")

    dense = {(r["seed"], at(r)): r["value"] for r in rows if r["recipe"] == "dense" and r["value"] is not None}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["value"] is not None:
            block = None if r["block"] is None else block_label(r["block"])  # older rows: an int
            groups.setdefault((r["recipe"], r["permute"], r["level"], block, at(r)), []).append(r)
    out = []
    for (recipe, permute, level, block, epochs), mine in groups.items():
        mean, std = _mean_std([r["value"] for r in mine])
        pairs = [(r["value"], dense[(r["seed"], epochs)]) for r in mine if (r["seed"], epochs) in dense]
        gap, gap_std = _mean_std([v - d for v, d in pairs]) if pairs else (math.nan, math.nan)
        rel = _mean_std([100.0 * (v / d - 1.0) for v, d in pairs if d]) if pairs else (math.nan, math.nan)
        also = [r["also"] for r in mine if r.get("also") is not None]
        kept = [(r["kept_before"], r["kept_after"]) for r in mine if "kept_before" in r]
        out.append(
            {
                "recipe": recipe,
                "permute": permute,
                "sparsity": level,
                "block": block,
                "epochs": epochs,
                "mean": mean,
                "std": std,
                "gap": gap,
                "gap_std": gap_std,
                "gap_pct": rel[0],
                "gap_pct_std": rel[1],
                "also": _mean_std(also) if also else None,
                "seeds": len(mine),
                "kept_before": statistics.mean(k[0] for k in kept) if kept else None,
                "kept_after": statistics.mean(k[1] for k in kept) if kept else None,
            }
        )
    return sorted(
        out,
        key=lambda e: (e["sparsity"], _block_order(e["block"]), e["epochs"] or 0, e["recipe"] != "dense",
                       e["recipe"], e["permute"]),
    )  # fmt: skip


def table(entries: list[dict], metric: str) -> str:
    """The markdown table; perplexities add their gap in percent of dense and the perplexity per byte."""
    lm = metric in ALSO
    extra = f" gap in % of dense | {ALSO[metric]} |" if lm else ""
    lines = [
        f"| recipe | permute | sparsity | block | epochs | {metric} (mean +- std) | gap to dense (mean +- std) |"
        f"{extra} kept magnitude before -> after | seeds |",
        "|---|---|---|---|---|---|---|" + ("---|---|" if lm else "") + "---|---|",
    ]
    for e in entries:
        kept = f"{e['kept_before']:.3f} -> {e['kept_after']:.3f}" if e["kept_before"] is not None else "-"
        dense = e["recipe"] == "dense" or math.isnan(e["gap"])
        gap = "-" if dense else f"{e['gap']:+.2f} +- {e['gap_std']:.2f}"
        cells = ""
        if lm:
            pct = "-" if dense else f"{e['gap_pct']:+.1f}% +- {e['gap_pct_std']:.1f}"
            also = "-" if e.get("also") is None else f"{e['also'][0]:.3f} +- {e['also'][1]:.3f}"
            cells = f" {pct} | {also} |"
        lines.append(
            f"| {e['recipe']} | {e['permute']} | {e['sparsity']:.0%} | {e['block'] or '-'} | {e['epochs'] or '-'} | "
            f"{e['mean']:.2f} +- {e['std']:.2f} | {gap} |{cells} {kept} | {e['seeds']} |"
        )
    return "\n".join(lines)


def plot(entries: list[dict], path: Path, title: str, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({e["sparsity"] for e in entries if e["block"] is not None})
    fig, axes = plt.subplots(1, max(1, len(levels)), figsize=(5.5 * max(1, len(levels)), 4.2), squeeze=False)
    markers = {"square": "o", "tall": "^", "wide": "v"}
    for ax, level in zip(axes[0], levels, strict=False):
        mine = [e for e in entries if e["sparsity"] == level and e["block"] is not None and not math.isnan(e["gap"])]
        for key in sorted({(e["recipe"], e["permute"], e["epochs"] or 0, tile_kind(e["block"])) for e in mine}):
            pts = sorted(
                (math.prod(block_shape(e["block"])), e["gap"], e["gap_std"], e["block"])
                for e in mine
                if (e["recipe"], e["permute"], e["epochs"] or 0, tile_kind(e["block"])) == key
            )
            xs, ys, es, names = zip(*pts, strict=True)
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                marker=markers[key[3]],
                capsize=3,
                ls="-" if key[1] == "none" else "--",
                label=f"{key[0]}, permute {key[1]}, {key[3]} tiles" + (f", {key[2]} epochs" if key[2] else ""),
            )
            if key[3] != "square":
                for x, y, name in zip(xs, ys, names, strict=True):
                    ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0.0, color="black", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tile area (rows x cols; squares 16 / 32 / 64 at 256 / 1024 / 4096)")
        ax.set_ylabel(f"{metric} - dense")
        ax.set_title(f"{title}: {level:.0%} sparsity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def tile_kind(label: str | int) -> str:
    """square, tall (more output rows than input columns) or wide."""
    rows, cols = block_shape(label)
    return "square" if rows == cols else "tall" if rows > cols else "wide"


def plot_length(entries: list[dict], path: Path, title: str, metric: str) -> None:
    """The run-length axis: each configuration's metric against epochs, dense included (one panel per sparsity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({e["sparsity"] for e in entries if e["recipe"] != "dense"})
    fig, axes = plt.subplots(1, max(1, len(levels)), figsize=(5.5 * max(1, len(levels)), 4.2), squeeze=False)
    for ax, level in zip(axes[0], levels, strict=False):
        keys = {(e["recipe"], e["permute"], e["block"]) for e in entries if e["sparsity"] in (level, 0.0)}
        for key in sorted(keys, key=str):
            mine = [
                e for e in entries if (e["recipe"], e["permute"], e["block"]) == key and e["sparsity"] in (level, 0)
            ]
            xs, ys, es = zip(*sorted((e["epochs"], e["mean"], e["std"]) for e in mine), strict=True)
            dense = key[0] == "dense"
            label = "dense" if dense else f"{key[0]}, block {key[2]}, permute {key[1]}"
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label, color="black" if dense else None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epochs")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {level:.0%} sparsity against run length")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def resolution(args: argparse.Namespace, entries: list[dict]) -> str:
    """What this validation set can tell apart: the binomial standard error of one run's accuracy at the dense
    accuracy, and the smallest gap a single run and the seeds' mean resolve (two standard errors of a difference)."""
    val = Path(args.root) / "val"
    if PRESETS[args.preset][1] != "val_top1":
        return _seed_resolution(args, entries)
    if "data.root={root}" not in " ".join(PRESETS[args.preset][0]) or not val.is_dir():
        return ""
    n = sum(1 for f in val.rglob("*") if f.is_file())
    dense = [e["mean"] for e in entries if e["recipe"] == "dense"]
    if not n or not dense:
        return ""
    p = min(max(statistics.mean(dense) / 100.0, 0.0), 1.0)
    se = 100.0 * math.sqrt(p * (1 - p) / n)
    one = 2 * math.sqrt(2) * se
    k = max(1, len(args.seeds))
    spreads = [e["gap_std"] for e in entries if e["recipe"] != "dense" and not math.isnan(e["gap_std"])]
    spread = f"; seeds' spread of the gaps (std) {statistics.mean(spreads):.2f} points on average" if spreads else ""
    return (
        f"Validation set: {n} images; one run's accuracy has a binomial standard error of {se:.2f} points at the "
        f"dense accuracy, so one run resolves gaps above {one:.2f} points and a mean of {k} seeds above "
        f"{one / math.sqrt(k):.2f}{spread}.\n\n"
    )


def _seed_resolution(args: argparse.Namespace, entries: list[dict]) -> str:
    """Where no sampling formula applies (perplexity): what the seeds say, the mean spread of the gaps over seeds
    and the smallest gap a mean of that many seeds resolves (two standard errors of a difference)."""
    spreads = [e["gap_std"] for e in entries if e["recipe"] not in ("dense", "as_is") and e["seeds"] > 1]
    spreads = [v for v in spreads if not math.isnan(v)]
    if not spreads:
        return ""
    spread, k = statistics.mean(spreads), max(1, len(args.seeds))
    return (
        f"Seeds' spread of the gaps (std): {spread:.3f} on average, so a mean of {k} seeds resolves gaps above "
        f"{2 * math.sqrt(2) * spread / math.sqrt(k):.3f}.\n\n"
    )


# -------------------------------------------------------------------------------------------------------- main


def ensure_data(args: argparse.Namespace) -> None:
    """The digits presets read an image tree: write it (scikit-learn's bundled digits, offline) when missing. A
    pretrained preset's model folder must exist."""
    preset = " ".join(PRESETS[args.preset][0])
    if "model.pretrained={root}" in preset and not (Path(args.root) / "config.json").is_file():
        sys.exit(
            f"--root {args.root} is not a converted model folder (no config.json): run "
            "scripts/pretrained/smollm2.py first (pip install -e '.[gguf]'), or pass --root <that folder>"
        )
    if "data.root={root}" not in preset or (Path(args.root) / "train").is_dir():
        return
    try:
        import sklearn  # noqa: F401
    except ImportError:
        sys.exit(
            f"--root {args.root} holds no image tree and scikit-learn is missing: pip install scikit-learn "
            f"&& python scripts/digits_tree.py {args.root}"
        )
    subprocess.run([sys.executable, "scripts/digits_tree.py", args.root], cwd=ROOT, check=True)


def describe(jobs: list[dict], args: argparse.Namespace) -> str:
    lengths = len(args.epochs or [None])
    dense = sum(j["recipe"] in ("dense", "as_is") for j in jobs)
    waves = math.ceil(len(jobs) / max(1, args.parallel))
    return (
        f"{len(jobs)} runs ({dense} dense + {len(jobs) - dense} sparse = {len(args.recipes)} recipes x "
        f"{len(args.permute)} permutations x {len(args.blocks)} blocks x {len(args.levels)} sparsities x "
        f"{lengths} run lengths x {len(args.seeds)} seeds), {args.parallel} at a time: {waves} waves of runs"
        + (f"; budget {args.budget_minutes:g} min" if args.budget_minutes else "")
    )


def run_all(jobs: list[dict], args: argparse.Namespace) -> list[dict]:
    budget, rows, lock = Budget(args.budget_minutes), [], threading.Lock()
    rows_file = Path(args.out) / "runs.jsonl"

    def one(job: dict) -> dict:
        row = run(job, args, budget)
        with lock, open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    # every run is queued at once, dense runs first: a worker is never idle while runs wait, and only a run that
    # needs its seed's dense run (the finetune recipe starts from it, --teacher dense distils from it) waits for it
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        dense = {j["name"]: pool.submit(one, j) for j in jobs if j["recipe"] == "dense"}

        def after_dense(job: dict) -> dict:
            needed = job.get("after")
            if needed is not None and needed in dense:
                dense[needed].result()  # queued before this job, so already running or done: no deadlock
            return one(job)

        others = [pool.submit(after_dense, j) for j in jobs if j["recipe"] != "dense"]
        rows += [f.result() for f in dense.values()] + [f.result() for f in others]
    return rows


def write_outputs(rows: list[dict], args: argparse.Namespace, head: str) -> str:
    out = Path(args.out)
    metric = PRESETS[args.preset][1]
    entries = summarize(rows)
    md = head + resolution(args, entries) + table(entries, metric) + "\n"
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"rows": entries, "runs": rows}, indent=1))
    keys = sorted({k for r in rows for k in r})
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    if any(e["recipe"] != "dense" for e in entries):
        plot(entries, out / "accuracy.png", args.preset, metric)
        if len({e["epochs"] for e in entries}) > 1:
            plot_length(entries, out / "accuracy_vs_length.png", args.preset, metric)
    return md


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    jobs = jobs_for(args)
    print(describe(jobs, args), flush=True)
    if args.dry_run:
        for job in jobs:
            print(" ".join(command(job, args)[1:]))
        return
    ensure_data(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows = run_all(jobs, args)
    cmd = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    done = sum(r["status"] == "ok" for r in rows)
    head = (
        f"{args.preset}, seeds {args.seeds}, device {args.device}, {args.parallel} runs at a time; "
        f"{time.strftime('%Y-%m-%d')}; {(time.time() - start) / 60:.1f} min; {done} of {len(rows)} runs "
        f"finished\n\n`{cmd}`\n\n"
    )
    print(write_outputs(rows, args, head))


if __name__ == "__main__":
    main()
