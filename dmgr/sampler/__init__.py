"""The DMGR sampling loop, its loss, gates and the defect-mask methods. Knows no files."""

from dmgr.sampler.dmgr import DMGRResult, PassCounter, crop_windows, dmgr_sample, model_eps
from dmgr.sampler.noise import NoiseSource, PerSampleNoise, ReplayNoise, initial_noise, make_generators
from dmgr.sampler.plain import ddim_sample
from dmgr.sampler.settings import MASK_CHANNEL, RGB, DMGRSettings, has_mask_channel

__all__ = [
    "MASK_CHANNEL",
    "has_mask_channel",
    "RGB",
    "DMGRResult",
    "DMGRSettings",
    "NoiseSource",
    "PassCounter",
    "PerSampleNoise",
    "ReplayNoise",
    "crop_windows",
    "ddim_sample",
    "dmgr_sample",
    "initial_noise",
    "make_generators",
    "model_eps",
]
