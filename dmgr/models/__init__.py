"""Networks: the guided-diffusion compatible UNet and its checkpoints."""

from dmgr.models.unet import UNetConfig, UNetModel, build_unet

__all__ = ["UNetConfig", "UNetModel", "build_unet"]
