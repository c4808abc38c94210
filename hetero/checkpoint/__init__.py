"""Loading checkpoints: a safetensors folder straight into the formats hetero runs it in.

    model = hetero.load_pretrained(folder, accel="cpu", host_dtype="int4")

files.py reads and checks the safetensors shards, layout.py finds each model tensor in them (transformers'
fused experts from per-expert tensors, FP8 block scales), load.py places and materialises the model.
"""

from __future__ import annotations

from hetero.checkpoint.files import CheckpointFiles
from hetero.checkpoint.load import LoadReport, load_pretrained

__all__ = ["CheckpointFiles", "LoadReport", "load_pretrained"]
