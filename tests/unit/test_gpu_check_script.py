"""scripts/gpu_check.sh, the GPU check, run on the CPU with its stages made to hang: stopped from outside (a time
limit around the whole check), it still writes its summary line and sends the logs back."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_a_check_stopped_from_outside_still_writes_its_line_at_once(tmp_path):
    shim = tmp_path / "bin"
    shim.mkdir()
    python = shim / "python"  # every pytest stage hangs; everything else runs as it would
    hang = '[[ "$1 $2" == "-m pytest" ]] && exec sleep 120'
    python.write_text(f'#!/usr/bin/env bash\n{hang}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
        "GPU_CHECK_DIR": str(tmp_path / "check"),
        "GPU_CHECK_CSV": str(tmp_path / "checks.csv"),
        "OUT": str(tmp_path / "back"),
    }
    start = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "scripts/gpu_check.sh", "abc1234"], cwd=REPO, env=env, stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        time.sleep(3)  # inside the quick suite's stage
        proc.send_signal(signal.SIGTERM)  # the script alone: its trap must stop the stages itself
        out, _ = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the check left running
    assert proc.returncode == 143
    assert time.monotonic() - start < 30  # at once: not after the hanging stage's 120 s, nor its 240 s limit
    (row,) = csv.DictReader((tmp_path / "checks.csv").open())
    assert row["commit"] == "abc1234"
    codes = dict(kv.split("=") for kv in row["exit_codes"].split(","))
    assert codes["stopped"] == "TERM" and codes["quick"] == codes["timing"] == codes["bench"] == "-"
    assert b"gpu_check commit=abc1234" in out
    assert (tmp_path / "back" / "checks.csv").read_text() == (tmp_path / "checks.csv").read_text()


def test_the_summary_line_is_appended_with_the_files_own_line_ends(tmp_path):
    """Appended lines end as the committed CSV's do (Unix): the csv module's default, CRLF, had mixed them."""
    checks = tmp_path / "checks.csv"
    checks.write_bytes((REPO / "docs/data/gpu_checks.csv").read_bytes().splitlines()[0] + b"\n")
    rc = "quick=0,timing=0,sanitize=0,export=0,bench=0,serve=0"
    args = ["--commit", "abc1234", "--out", str(tmp_path), "--seconds", "5", "--test-seconds", "", "--rc", rc]
    subprocess.run([sys.executable, "scripts/gpu_check_summary.py", *args, "--csv", str(checks)], cwd=REPO, check=False)
    data = checks.read_bytes()
    assert b"\r" not in data and data.count(b"\n") == 2 and b"abc1234" in data
