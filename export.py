"""Export a trained run to a sparse checkpoint: `python export.py checkpoint=outputs/<run> [dtype=bf16] [layout=auto]`.

Writes exports/<run>/ (model.safetensors with BSR weights, dense_state_dict.safetensors, manifest.json); see
configs/export.yaml for every option and docs/export.md for the format.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from superblock.cli import export_main

    export_main(cfg)


if __name__ == "__main__":
    from superblock.cli import quote_path_arguments

    sys.argv = quote_path_arguments(sys.argv)  # a sweep job's directory, as typed
    main()
