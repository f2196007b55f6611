"""The one summary line of scripts/gpu_check.sh: tests passed / failed, seconds, sanitizer errors and three key
ratios, printed and appended to a CSV.

    python scripts/gpu_check_summary.py --commit C --out DIR --seconds S --test-seconds T --rc a=0,b=1 --csv F
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

FIELDS = ["commit", "date", "passed", "failed", "skipped", "seconds", "test_seconds", "sanitizer_errors",
          "fc2_b64_90_eager_x", "fc2_b64_90_graph_x", "served_min_x", "exit_codes"]  # fmt: skip


def junit_counts(paths: list[Path]) -> tuple[int, int, int]:
    passed = failed = skipped = 0
    for p in paths:
        if not p.exists():
            failed += 1  # the run never wrote its report: count it as a failure
            continue
        root = ET.parse(p).getroot()
        for suite in root.iter("testsuite"):
            n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
            passed += n - f - e - s
            failed += f + e
            skipped += s
    return passed, failed, skipped


def sanitizer_errors(log: Path) -> int | str:
    if not log.exists():
        return "not run"
    found = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", log.read_text(errors="replace"))]
    return sum(found) if found else "no summary"


def bench_ratios(csv_path: Path) -> tuple[str, str]:
    if not csv_path.exists():
        return "nan", "nan"
    for row in csv.DictReader(csv_path.open()):
        if (row["layer"], row["block"], row["sparsity"], row["mode"], row["batch"]) == (
            "vitb_fc2", "64x64", "0.9", "bf16", "256",
        ):  # fmt: skip
            return (f"{float(row['ours_x']):.2f}" if row.get("ours_x") else "nan",
                    f"{float(row['ours_graph_x']):.2f}" if row.get("ours_graph_x") else "nan")  # fmt: skip
    return "nan", "nan"


def served_min(json_path: Path) -> str:
    if not json_path.exists():
        return "nan"
    rows = json.loads(json_path.read_text())
    return f"{min(r['ratio_best'] for r in rows):.2f}" if rows else "nan"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    for name in ("--commit", "--out", "--seconds", "--test-seconds", "--rc", "--csv"):
        p.add_argument(name, required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    passed, failed, skipped = junit_counts([out / "quick.xml", out / "timing.xml"])
    errors = sanitizer_errors(out / "sanitize.log")
    eager_x, graph_x = bench_ratios(out / "bsr_linear_quick.csv")
    row = {
        "commit": a.commit, "date": dt.date.today().isoformat(), "passed": passed, "failed": failed,
        "skipped": skipped, "seconds": a.seconds, "test_seconds": a.test_seconds, "sanitizer_errors": errors,
        "fc2_b64_90_eager_x": eager_x, "fc2_b64_90_graph_x": graph_x,
        "served_min_x": served_min(out / "serve_probe.json"), "exit_codes": a.rc,
    }  # fmt: skip
    path = Path(a.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS, lineterminator="\n")  # the committed file's line ends
        if new:
            w.writeheader()
        w.writerow(row)
    print("gpu_check " + " ".join(f"{k}={v}" for k, v in row.items()))
    codes = dict(kv.split("=") for kv in a.rc.split(","))
    bad = failed or errors not in (0,) or any(codes.get(k, "0") != "0" for k in ("quick", "timing", "sanitize"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
