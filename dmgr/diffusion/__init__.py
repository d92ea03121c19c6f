"""Diffusion processes: beta schedules, respacing, DDIM steps, undo and the time-travel walk."""

from dmgr.diffusion.ddim import ddim_step, predict_x0, undo_step
from dmgr.diffusion.schedule import Diffusion, beta_schedule, make_diffusion, space_timesteps
from dmgr.diffusion.walk import time_walk

__all__ = [
    "Diffusion",
    "beta_schedule",
    "ddim_step",
    "make_diffusion",
    "predict_x0",
    "space_timesteps",
    "time_walk",
    "undo_step",
]
