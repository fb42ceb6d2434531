"""Checkpoint file IO for the streaming merge engine.

Reading safetensors files one tensor (or one block of rows) at a time, planning and writing
sharded safetensors output at precomputed offsets, and publishing the output folder atomically
with resume after a crash. Nothing here ever holds a whole model in memory.
"""

from merge_kernels.io.reader import SafetensorsReader
from merge_kernels.io.safetensors_header import SafetensorsHeader, TensorEntry, read_header
from merge_kernels.io.shard_plan import OutputTensor, ShardSpec, index_json, plan_shards
from merge_kernels.io.shard_writer import ShardWriter
from merge_kernels.io.staging import StagingDir, write_bytes_atomic, write_json_atomic

__all__ = [
    "OutputTensor",
    "SafetensorsHeader",
    "SafetensorsReader",
    "ShardSpec",
    "ShardWriter",
    "StagingDir",
    "TensorEntry",
    "index_json",
    "plan_shards",
    "read_header",
    "write_bytes_atomic",
    "write_json_atomic",
]
