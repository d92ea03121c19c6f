"""Networks: the guided-diffusion compatible UNet and its checkpoints. Knows no sampler."""

from dmgr.models.checkpoints import (
    CheckpointError,
    file_digest,
    load_unet,
    read_checkpoint,
    save_checkpoint,
    stored_config,
    stored_metadata,
)
from dmgr.models.unet import UNetConfig, UNetModel, build_unet

__all__ = [
    "CheckpointError",
    "UNetConfig",
    "UNetModel",
    "build_unet",
    "file_digest",
    "load_unet",
    "read_checkpoint",
    "save_checkpoint",
    "stored_config",
    "stored_metadata",
]
