"""Train a model with learned block masks: `python train.py [overrides]` (see README and configs/)."""

import os
import sys

import hydra
from omegaconf import DictConfig

if int(os.environ.get("RANK", "0")) > 0:
    # Under torchrun only rank 0 owns a run directory (shared with the others at start-up): keep Hydra from
    # creating one per rank.
    sys.argv += [
        "hydra.output_subdir=null",
        "hydra.run.dir=.",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from superblock.cli import train_main

    return train_main(cfg)


if __name__ == "__main__":
    from superblock.cli import quote_path_arguments

    sys.argv = quote_path_arguments(sys.argv)  # a sweep job's directory, as typed
    main()
