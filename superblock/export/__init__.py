"""Sparse checkpoints: export a trained run to BSR safetensors + manifest, load it back for inference.

```python
from superblock.export import export_checkpoint, load_sparse
result = export_checkpoint("outputs/<run>", "exports/<run>", dtype="bf16", layout="auto")
model = load_sparse("exports/<run>", device="cuda")     # BlockSparseLinear / block-sparse attention inside
served = load_sparse("exports/<run>", device="cuda", dtype="bf16", runtime="cudagraph", batch_sizes=[1, 8, 32, 256])
fast = make_runtime(my_model, "compile", batch_sizes=[1, 8, 32, 256])  # any model (BlockSparseLinear inside or not)
lm = load_sparse("exports/<lm run>")         # a transformers model (hf: spec): lm.generate(ids, max_new_tokens=20)
lm.generate(ids, max_new_tokens=128, cache_implementation="static", custom_generate=graph_decoding)  # CUDA-graph steps
```
The on-disk format is described in superblock/artifacts/format.py and docs/export.md.
"""

from superblock.artifacts.format import FORMAT, VERSION, ExportError, read_manifest
from superblock.artifacts.resolve import is_export_dir
from superblock.devices import DTYPES, ensure_runnable, parse_dtype, resolve_device
from superblock.export.convert import Layer, install_bsr, masked_layers, pack_tensors
from superblock.export.decoding import graph_decoding
from superblock.export.loader import load_folded, load_sparse
from superblock.export.serving import (
    RUNTIMES,
    SampleInput,
    ServingModel,
    make_runtime,
    prepare_for_decoding,
    sample_input,
    set_model_tuning_target,
    warm_up,
)
from superblock.export.source import Source, load_source
from superblock.export.tolerances import TOLERANCES
from superblock.export.writer import ExportResult, export_checkpoint, fold_copy, image_shape, summary_table
from superblock.timing import compare_latency

__all__ = [
    "DTYPES",
    "FORMAT",
    "RUNTIMES",
    "SampleInput",
    "TOLERANCES",
    "VERSION",
    "ExportError",
    "ExportResult",
    "Layer",
    "ServingModel",
    "Source",
    "compare_latency",
    "ensure_runnable",
    "export_checkpoint",
    "fold_copy",
    "graph_decoding",
    "image_shape",
    "install_bsr",
    "is_export_dir",
    "load_folded",
    "load_source",
    "load_sparse",
    "make_runtime",
    "masked_layers",
    "pack_tensors",
    "parse_dtype",
    "prepare_for_decoding",
    "read_manifest",
    "resolve_device",
    "sample_input",
    "set_model_tuning_target",
    "summary_table",
    "warm_up",
]
