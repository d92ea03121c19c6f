"""The project's sampler against runs of the published reference sampler (../shared/fixtures/dmgr-reference/).

Every setting, size and architecture comes from the file itself, so another reference run of the same form
is checked by the same test: set DMGR_REFERENCE_FIXTURE to its path (or its name in the fixture folder) to
run on that file alone. Without the folder the test skips, except under CI=true, where it fails.
"""

import dataclasses
import os

import pytest
import torch
from conftest import FIXTURE_DIR, FIXTURE_NAMES

from dmgr.diffusion import make_diffusion, time_walk
from dmgr.models import build_unet
from dmgr.sampler import DMGRSettings, ReplayNoise, ddim_sample, dmgr_sample

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

TOLERANCE = 1e-3
SETTINGS_FIELDS = {f.name for f in dataclasses.fields(DMGRSettings)}
# keys of `settings` that are not DMGRSettings fields, and where they go
OTHER_KEYS = {
    "steps", "respacing", "diffusion_steps", "beta_schedule", "window_x", "window_y", "window_size", "class_id",
}


def fixture_names():
    chosen = os.environ.get("DMGR_REFERENCE_FIXTURE")
    if chosen:
        return [chosen]
    names = set(FIXTURE_NAMES)
    if FIXTURE_DIR.is_dir():
        names |= {path.name for path in FIXTURE_DIR.glob("*.pt")}
    return sorted(names)


@pytest.fixture(params=fixture_names())
def reference(request, load_reference):
    return load_reference(request.param)


def load_model(ref, which):
    model = build_unet(ref[f"{which}_config"])
    model.load_state_dict(ref[f"{which}_state_dict"], strict=True)
    return model.eval()


def sampler_inputs(ref):
    settings = dict(ref["settings"])
    unknown = set(settings) - SETTINGS_FIELDS - OTHER_KEYS
    assert not unknown, f"settings this test does not know how to pass on: {sorted(unknown)}"
    diffusion = make_diffusion(settings["diffusion_steps"], settings["beta_schedule"], settings["respacing"])
    assert diffusion.num_steps == settings["steps"]
    dmgr_settings = DMGRSettings(**{k: v for k, v in settings.items() if k in SETTINGS_FIELDS})
    windows = torch.tensor([[settings["window_x"], settings["window_y"]]])
    classes = torch.tensor([settings["class_id"]])
    return diffusion, dmgr_settings, windows, classes, settings["window_size"]


def first_departure(result, ref):
    """A line naming the first reverse step whose state or loss departs from the reference trace."""
    for i, entry in enumerate(result.trace):
        if i >= len(ref["trace_t"]):
            return f"the project takes {len(result.trace)} reverse steps, the reference {len(ref['trace_t'])}"
        walk = (int(ref["trace_t"][i]), int(ref["trace_prev_t"][i]))
        if (entry["t"], entry["prev_t"]) != walk:
            return f"step {i}: project goes {entry['t']}->{entry['prev_t']}, reference {walk[0]}->{walk[1]}"
        dx = (entry["x_prev"][0] - ref["trace_x_prev"][i]).abs().max().item()
        dc = (entry["crop_prev"][0] - ref["trace_crop_prev"][i]).abs().max().item()
        loss, ref_loss = float(entry["loss"][0]), float(ref["trace_loss"][i])
        dl = abs(loss - ref_loss) / max(1.0, abs(ref_loss))
        if dx > TOLERANCE or dc > TOLERANCE or dl > 1e-3:
            return (
                f"first departure at reverse step {i} ({walk[0]}->{walk[1]}): max |dx| {dx:.3g}, max |dcrop| {dc:.3g}, "
                f"loss {loss:.6g} vs reference {ref_loss:.6g}"
            )
    return f"no trace step departs by more than {TOLERANCE}; the difference arises after the last reverse step"


def test_reference_run(reference):
    ref = reference
    global_model, local_model = load_model(ref, "global"), load_model(ref, "local")
    diffusion, settings, windows, classes, window_size = sampler_inputs(ref)
    time_travel = "undo_t" in ref
    assert settings.time_travel == time_travel, "settings.time_travel disagrees with the presence of undo_t"

    walk = time_walk(diffusion.num_steps, settings.time_travel, settings.jump_length, settings.jump_n_sample)
    moves = list(zip(walk[:-1], walk[1:]))
    assert [(a, b) for a, b in moves if b < a] == list(zip(ref["trace_t"].tolist(), ref["trace_prev_t"].tolist()))
    noise = None
    if time_travel:
        assert [b for a, b in moves if b > a] == ref["undo_t"].tolist()
        noise = ReplayNoise(undo_x=list(ref["undo_noise_x"]), undo_crop=list(ref["undo_noise_crop"]))

    result = dmgr_sample(
        global_model, local_model, diffusion, ref["noise"], windows, classes, window_size, settings, noise,
        record_trace=True,
    )
    sample_diff = (result.image - ref["sample"]).abs().max().item()
    crop_diff = (result.crop - ref["crop"]).abs().max().item()
    assert sample_diff <= TOLERANCE and crop_diff <= TOLERANCE, (
        f"sample differs by {sample_diff:.3g}, crop by {crop_diff:.3g}; {first_departure(result, ref)}"
    )
    assert len(result.trace) == len(ref["trace_t"])
    if time_travel:
        assert all(not queue for queue in noise.queues.values()), "recorded undo noise left unused"
        assert len(result.pre_undo) == len(ref["pre_undo_x"])
        for i, (x, c) in enumerate(result.pre_undo):
            dx = (x[0] - ref["pre_undo_x"][i]).abs().max().item()
            dc = (c[0] - ref["pre_undo_crop"][i]).abs().max().item()
            assert dx <= TOLERANCE and dc <= TOLERANCE, f"optimise-before-undo pass {i}: |dx| {dx:.3g}, |dc| {dc:.3g}"


def test_reference_plain_ddim(reference):
    ref = reference
    diffusion, *_ = sampler_inputs(ref)
    plain = ddim_sample(load_model(ref, "global"), diffusion, ref["noise"], eta=float(ref["settings"]["eta"]))
    assert (plain - ref["plain_ddim_sample"]).abs().max().item() <= 1e-4
