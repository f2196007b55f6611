"""Evaluate a run or an export: `python evaluate.py checkpoint=<run dir | export dir> [mode=all] [dtype=bf16]`.

Top-1/top-5 on the validation split (data config from the run), latency and throughput vs the dense model,
weight memory; writes eval.json next to the checkpoint. See configs/evaluate.yaml and docs/export.md.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from superblock.cli import evaluate_main

    evaluate_main(cfg)


if __name__ == "__main__":
    from superblock.cli import quote_path_arguments

    sys.argv = quote_path_arguments(sys.argv)  # a sweep job's directory, as typed
    main()
