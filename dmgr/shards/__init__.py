"""Webdataset shards: the writer thread, atomic completion, per-shard records and locks, the resume
check and the run manifest.

Knows nothing of diffusion: it receives finished samples as arrays and metadata.
"""

from dmgr.shards.dataset import collate, dataset
from dmgr.shards.layout import shard_name, shard_path, verify_shard
from dmgr.shards.locks import LockHeld
from dmgr.shards.manifest import write_manifest
from dmgr.shards.records import check_shard, read_record
from dmgr.shards.writer import ShardWriteError, ShardWriter

__all__ = [
    "LockHeld",
    "ShardWriteError",
    "ShardWriter",
    "check_shard",
    "collate",
    "dataset",
    "read_record",
    "shard_name",
    "shard_path",
    "verify_shard",
    "write_manifest",
]
