"""Webdataset shards: the writer thread, atomic completion, the resume scan and the run manifest.

Knows nothing of diffusion: it receives finished samples as arrays and metadata.
"""

from dmgr.shards.layout import shard_name, shard_path, verify_shard
from dmgr.shards.manifest import write_manifest
from dmgr.shards.writer import ShardWriter

__all__ = ["ShardWriter", "shard_name", "shard_path", "verify_shard", "write_manifest"]
