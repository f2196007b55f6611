"""Accuracy of sparse recipes next to dense, on real offline data, several seeds: one table and one plot.

    python scripts/digits_tree.py data/digits
    python benchmarks/accuracy.py --data digits --root data/digits --out docs/results_digits
    python benchmarks/accuracy.py --data synthetic --epochs 5 --out docs/results_synthetic

For every seed: a dense run; then at every (sparsity, block size): the reference recipe (sparsity=
supermask_reference), our from-scratch default (sparsity=supermask) and our fine-tune of that seed's dense run
with distillation from it (experiment=sparse_finetune). Every row trains for the same epochs on the same data.
Each job is a real `python train.py` run (its run dir kept under --out/runs); --jobs runs several at once.
Writes <out>/results.md (mean +- std over seeds, gap to dense), results.json and accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "reference": ["sparsity=supermask_reference"],
    "ours (scratch)": ["sparsity=supermask"],
    "ours (fine-tune + KD)": ["experiment=sparse_finetune"],
}


def data_args(args) -> list[str]:
    if args.data == "digits":
        return ["data=small_images", f"data.root={args.root}", "data.image_size=16"]
    return ["data=synthetic"]


def run(job: dict, args) -> dict:
    run_dir = Path(args.out) / "runs" / job["name"]
    summary = run_dir / "summary.json"
    if not summary.exists():
        cmd = [sys.executable, "train.py", *data_args(args), f"seed={job['seed']}", f"trainer.max_epochs={args.epochs}",
               f"trainer.threads={args.threads}", f"hydra.run.dir={run_dir}", *args.extra, *job["overrides"]]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"FAILED {job['name']}: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            return {**job, "val_top1": None}
    s = json.loads(summary.read_text())
    print(f"done {job['name']}: {s['val_top1']:.2f}%", flush=True)
    return {**job, "val_top1": s["val_top1"], "wall_time_s": s.get("wall_time_s")}


def jobs_for(args) -> tuple[list[dict], list[dict]]:
    dense, sparse = [], []
    for seed in args.seeds:
        dense_dir = Path(args.out).resolve() / "runs" / f"dense_s{seed}"
        dense.append({"name": f"dense_s{seed}", "recipe": "dense", "seed": seed, "level": 0.0, "block": None,
                      "overrides": ["sparsity=none"]})
        for level in args.levels:
            for block in args.blocks:
                for recipe, overrides in RECIPES.items():
                    extra = [f"sparsity.level={level}", f"sparsity.block_size={block}"]
                    if "fine-tune" in recipe:
                        extra += [f"model.pretrained={dense_dir}"]
                    tag = recipe.split()[0] + ("_ft" if "fine-tune" in recipe else "")
                    sparse.append({"name": f"{tag}_l{level}_b{block}_s{seed}", "recipe": recipe, "seed": seed,
                                   "level": level, "block": block, "overrides": [*overrides, *extra]})
    return dense, sparse


def table(results: list[dict]) -> tuple[str, list[dict]]:
    groups: dict[tuple, list[float]] = {}
    for r in results:
        if r["val_top1"] is not None:
            groups.setdefault((r["recipe"], r["level"], r["block"]), []).append(r["val_top1"])
    dense = statistics.mean(groups.get(("dense", 0.0, None), [float("nan")]))
    rows = []
    for (recipe, level, block), vals in sorted(groups.items(), key=lambda kv: (kv[0][1], str(kv[0][2]), kv[0][0])):
        mean = statistics.mean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append({"recipe": recipe, "sparsity": level, "block": block, "mean": mean, "std": std,
                     "gap": mean - dense, "seeds": len(vals)})
    lines = ["| recipe | sparsity | block | val top-1 (mean +- std) | gap to dense | seeds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['sparsity']:.0%} | {r['block'] or '-'} | {r['mean']:.2f} +- {r['std']:.2f} "
                     f"| {r['gap']:+.2f} | {r['seeds']} |")
    return "\n".join(lines), rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    dense = next((r for r in rows if r["recipe"] == "dense"), None)
    if dense:
        ax.axhline(dense["mean"], color="black", lw=1, ls="--", label=f"dense {dense['mean']:.1f}%")
    for recipe, marker in zip(RECIPES, "osD", strict=True):
        for block, shade in zip(sorted({r["block"] for r in rows if r["block"]}), (0.45, 0.9), strict=False):
            mine = [r for r in rows if r["recipe"] == recipe and r["block"] == block]
            pts = sorted((r["sparsity"], r["mean"], r["std"]) for r in mine)
            if pts:
                xs, ys, es = zip(*pts, strict=True)
                ax.errorbar([100 * x for x in xs], ys, yerr=es, marker=marker, capsize=3, alpha=shade,
                            label=f"{recipe}, block {block}")
    ax.set_xlabel("block sparsity (%)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("digits", "synthetic"), default="digits")
    p.add_argument("--root", default="data/digits")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--levels", type=lambda s: [float(v) for v in s.split(",")], default=[0.8, 0.9])
    p.add_argument("--blocks", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/results")
    p.add_argument("extra", nargs="*", help="more train.py overrides for every job")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.time()
    dense, sparse = jobs_for(args)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run(j, args), dense))  # fine-tuning needs the dense runs first
        results += list(pool.map(lambda j: run(j, args), sparse))
    md, rows = table(results)
    cmd = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = (f"{args.data}, {args.epochs} epochs, seeds {args.seeds}, tiny_vit, CPU; {time.strftime('%Y-%m-%d')}; "
            f"{(time.time() - start) / 60:.0f} min\n\n`{cmd}`\n\n")
    (Path(args.out) / "results.md").write_text(head + md + "\n")
    (Path(args.out) / "results.json").write_text(json.dumps({"rows": rows, "runs": results}, indent=1))
    plot(rows, Path(args.out) / "accuracy.png", f"{args.data}: accuracy vs block sparsity ({args.epochs} epochs)")
    print(head + md)


if __name__ == "__main__":
    main()
