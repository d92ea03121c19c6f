"""Where a sample is recorded: the only place that knows the sample schema (docs/data.md "One sample" is its
specification). A decided seed (`Outcome`) becomes its shard members and json here, and a shard's jsons are
read back here: their metric sums for the shard record, and the check a shard found without a record passes
before it is adopted."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from dmgr import __version__
from dmgr.images import bounding_box
from dmgr.synth.backgrounds import Geometry
from dmgr.synth.config import RunSpec
from dmgr.synth.engine import Attempt, DefectResult
from dmgr.synth.geometry import context_box, image_window_box, square
from dmgr.synth.plan import Defect, SamplePlan, plan_sample
from dmgr.synth.policy import Outcome

# A float diagnostic (a sampler loss, a placement score) keeps this many significant digits: its last digits
# depend on the sample's batch-mates (kernel blocking), and the json must not, so that a shard redone with
# another batch_size reproduces its record.
DIAGNOSTIC_DIGITS = 4
PICTURES = {"crop.png": "crop", "twin.png": "twin", "grid.png": "grid", "paste.png": "paste"}


def diagnostic(value: float) -> float:
    """A float diagnostic to DIAGNOSTIC_DIGITS significant digits."""
    return float(f"{value:.{DIAGNOSTIC_DIGITS}g}")


def planned_defect(defect: Defect, geometry: Geometry) -> dict:
    """The json fields of one defect on a real background that its plan gives (boxes in image pixels): with
    candidates, their window boxes (the engine chooses the window)."""
    if defect.candidates:
        return {"class_name": defect.class_name, "class_id": defect.class_id,
                "candidate_boxes": [image_window_box(defect.placed(j, geometry), geometry)
                                    for j in range(len(defect.candidates))]}
    return {
        "class_name": defect.class_name,
        "class_id": defect.class_id,
        "window_box": image_window_box(defect, geometry),
        "context_box": context_box(defect, geometry),
    }


def config_fields(spec: RunSpec, digests: dict[str, str], plan: SamplePlan) -> dict:
    """The json fields a sample takes from the run's config and its seed's plan, none from sampling: what a
    shard found without a record is checked against before it is adopted. On a real background "defects"
    lists the planned part of each defect; the sample's entries add what sampling gives (mask box, area, loss)."""
    fields = {
        "seed": plan.seed,
        "class_name": plan.class_name,
        "class_id": plan.class_id,
        "mask_method": spec.mask.method,
        "image_size": spec.dataset.image_size,
        "dataset": spec.dataset.name,
        "source": spec.dataset.source,
        "schedule": dict(spec.schedule.given),
        "respacing": spec.schedule.respacing,
        "checkpoints": {"model": spec.model.name, **digests},
        "precision": spec.precision,
        "run_identity": spec.identity,
        "window_box": square(*plan.window, spec.dataset.window_size),
    }
    if spec.dataset.source != "images":
        return fields
    background, geometry = spec.backgrounds.items[plan.background], spec.backgrounds.geometry
    if plan.defects[0].candidates:
        fields.pop("window_box")  # the engine chooses it
    else:
        fields["window_box"] = image_window_box(plan.defects[0], geometry)
    return {
        **fields,
        "width": background.size[0],
        "height": background.size[1],
        "scale": spec.backgrounds.scale,
        "mask_pixels": spec.mask.pixels,
        "defects": [planned_defect(d, geometry) for d in plan.defects],
        "defects_requested": spec.dataset.defects_per_image,
        "background": {"image": background.name, "sha256": background.sha256, "index": plan.background},
    }


def _defect_json(result: DefectResult, geometry: Geometry) -> dict:
    """One defect's entry on a real background: what its plan gives (at the chosen candidate: its window and
    context box too) and what sampling gave."""
    planned = planned_defect(result.defect, geometry)
    if result.defect.candidates:
        planned = {**planned, **planned_defect(result.defect.settled(), geometry)}
    choice = result.placement
    return {
        **planned,
        "mask_box": result.mask_box,
        "mask_area": result.mask_area,
        "final_loss": diagnostic(result.final_loss),
        **({"placement": {"candidates": choice.candidates, "chosen": choice.chosen,
                          "score": diagnostic(choice.score)}} if choice else {}),
    }


def attempt_json(spec: RunSpec, digests: dict[str, str], attempt: Attempt) -> dict:
    """An attempt's json before any decision: the run, the plan, and the mask's box and area (a real image's
    also lists its defects and background)."""
    plan, first = attempt.plan, attempt.defects[0]
    meta = {
        "seed": plan.seed,
        **({"attempt": plan.attempt} if plan.attempt else {}),
        **config_fields(spec, digests, plan),
        "dmgr_version": __version__,
        "window_box": first.window_box,  # as sampled (config_fields gives the plan's, the same)
        "mask_box": bounding_box(attempt.mask),
        "mask_area": int(attempt.mask.sum()),
        "final_loss": diagnostic(first.final_loss),
    }
    if spec.dataset.source == "images":
        meta["defects"] = [_defect_json(d, spec.backgrounds.geometry) for d in attempt.defects]
    return meta


def outcome_json(spec: RunSpec, digests: dict[str, str], outcome: Outcome) -> dict:
    """The written json of a decided seed: its kept attempt's, then why it is flagged or skipped (`empty_mask`),
    its `retries`, and with the screen on the screen's decision (`screen`)."""
    meta = attempt_json(spec, digests, outcome.kept)
    verdict = outcome.verdict
    if verdict.reason == "empty_mask":
        meta["empty_mask"] = {"mask_area": verdict.small.areas, "min_area": verdict.small.minima,
                              "attempts": outcome.attempts, outcome.status: True}
    if outcome.retries:
        meta["retries"] = [{"attempt": a, "reason": r} for a, r in outcome.retries]
    if spec.screen.enabled:
        screened = verdict.screened
        meta["screen"] = {
            "accepted": verdict.reason is None,
            "attempt": verdict.attempt,
            "attempts": outcome.attempts,
            "reasons": screened.reasons if screened else ([verdict.reason] if verdict.reason else []),
            "scores": screened.scores if screened else {},
            "rejected": [{"attempt": r.attempt, "reasons": r.screened.reasons, "scores": r.screened.scores}
                         for r in outcome.rejected],
        }
        if verdict.reason == "screen":
            meta["screen"][outcome.status] = True
    return meta


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255)


def members(spec: RunSpec, attempt: Attempt, meta: dict) -> dict:
    """{"seed", + every member of `spec.extras.members(spec.available_masks)`}: the images as PIL images
    (uint8), the masks as 0/255 L images, the json the dict `meta`."""
    sample: dict = {"seed": attempt.plan.seed}
    for name in spec.extras.members(spec.available_masks):
        if name == "json":
            sample[name] = meta
        elif name == "png":
            sample[name] = Image.fromarray(attempt.image)
        elif name == "mask.png":
            sample[name] = _mask_image(attempt.mask)
        elif name == "input.png":
            sample[name] = Image.fromarray(attempt.given)
        elif name == "paste_mask.png":
            sample[name] = _mask_image(attempt.paste_mask)
        elif name in PICTURES:
            sample[name] = Image.fromarray(attempt.pictures[PICTURES[name]])
        else:  # mask_<method>.png
            sample[name] = _mask_image(attempt.masks[name[len("mask_") : -len(".png")]])
    return sample


def attempt_sample(spec: RunSpec, digests: dict[str, str], attempt: Attempt) -> dict:
    """An attempt as a shard would hold it, before any decision (what tests compare samples with)."""
    return members(spec, attempt, attempt_json(spec, digests, attempt))


def outcome_sample(spec: RunSpec, digests: dict[str, str], outcome: Outcome) -> dict:
    """A decided seed as its shard holds it."""
    return members(spec, outcome.kept, outcome_json(spec, digests, outcome))


# Reading back: a shard's jsons -> its record's metric sums, and the check before adopting it.


def add_metrics(total: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    return {**total, **{key: total.get(key, 0) + value for key, value in more.items()}}


def sample_metrics(meta: dict) -> dict[str, float]:
    """What the manifest's `metrics` averages, for one sample written."""
    boxes = [d["window_box"] for d in meta.get("defects", [meta])]
    window_area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes)
    return {
        "samples": 1,
        "defects": len(boxes),
        "final_loss": meta["final_loss"],
        "mask_area": meta["mask_area"],
        "mask_window_fraction": meta["mask_area"] / window_area,
        "empty_masks": int(meta["mask_area"] == 0),
        "fewer_defects_than_requested": int(len(boxes) < meta.get("defects_requested", 1)),
        **retry_metrics(meta),
    }


def retry_metrics(meta: dict) -> dict[str, float]:
    """The retries behind one sample by reason, and whether its mask check was exhausted."""
    reasons = [r["reason"] for r in meta.get("retries", [])]
    exhausted = meta.get("empty_mask", {})
    return {"nonfinite_retries": reasons.count("nonfinite"), "empty_masks_replaced": reasons.count("empty_mask"),
            "empty_masks_flagged": int(bool(exhausted.get("flagged"))),
            "empty_masks_skipped": int(bool(exhausted.get("skipped")))}


def screen_metrics(meta: dict) -> dict[str, float]:
    """One seed's screen counts for the shard record's sums: images generated, rejected attempts (per reason,
    per class of each defect), accepted / flagged / skipped."""
    g = meta["screen"]
    classes = [d["class_name"] for d in meta.get("defects", [meta])]
    rejected = g["rejected"] + ([] if g["accepted"] else [{"reasons": g["reasons"]}])
    out = {"screen_seeds": 1, "screen_generated": g["attempts"], "screen_accepted": int(g["accepted"]),
           "screen_flagged": int(g.get("flagged", False)), "screen_skipped": int(g.get("skipped", False)),
           "screen_rejected": len(rejected), "screen_scored": len(g["rejected"]) + 1}
    for attempt in rejected:
        for reason in attempt["reasons"]:
            out[f"screen_reason.{reason}"] = out.get(f"screen_reason.{reason}", 0) + 1
    for c in classes:
        out[f"screen_class_attempts.{c}"] = out.get(f"screen_class_attempts.{c}", 0) + len(g["rejected"]) + 1
        out[f"screen_class_rejected.{c}"] = out.get(f"screen_class_rejected.{c}", 0) + len(rejected)
    return out


def outcome_metrics(meta: dict, written: bool) -> dict[str, float]:
    """A seed's contribution to its shard record's metric sums, from its json: a skipped seed (not
    `written`) counts its screen decision and retries only."""
    metrics = screen_metrics(meta) if "screen" in meta else {}
    return add_metrics(metrics, sample_metrics(meta) if written else retry_metrics(meta))


def config_problem(spec: RunSpec, digests: dict[str, str], metas: dict[int, dict]) -> str | None:
    """None when every sample's json holds what this run's config and the seed's plan give; else the first
    difference (a shard made with another config, or damaged inside a json)."""
    for seed, meta in metas.items():
        plan = plan_sample(seed, spec.dataset, spec.backgrounds, int(meta.get("attempt", 0) or 0))
        expected = json.loads(json.dumps(config_fields(spec, digests, plan), default=str))
        for key, value in expected.items():
            found = _planned_part(meta.get(key), value) if key == "defects" else meta.get(key)
            if found != value:
                return f"seed {seed}: its json's {key} is {str(found)[:80]}, this run's {str(value)[:80]}"
        problem = _chosen_problem(spec, plan, meta.get("defects"))
        if problem is not None:
            return f"seed {seed}: its json's defects is {problem}"
    return None


def _chosen_problem(spec: RunSpec, plan: SamplePlan, found: object) -> str | None:
    """With candidates the plan fixes the boxes once the choice is known: each defect's window and context box
    must be those of the candidate its `placement.chosen` names."""
    if spec.dataset.source != "images" or not isinstance(found, list):
        return None
    geometry = spec.backgrounds.geometry
    for defect, entry in zip(plan.defects, found):
        if not defect.candidates:
            continue
        chosen = (entry.get("placement") or {}).get("chosen") if isinstance(entry, dict) else None
        if not isinstance(chosen, int) or not 0 <= chosen < len(defect.candidates):
            return f"placement.chosen {chosen!r}, this run's 0..{len(defect.candidates) - 1}"
        expected = planned_defect(defect.placed(chosen, geometry).settled(), geometry)
        for key in ("window_box", "context_box"):
            if entry.get(key) != expected[key]:
                return f"{key} {entry.get(key)}, this run's {expected[key]} (candidate {chosen})"
    return None


def _planned_part(found: object, planned: list[dict]) -> object:
    """A json's per-defect entries cut to the fields their plan gives (as is when not such a list)."""
    if not isinstance(found, list) or len(found) != len(planned) or not all(isinstance(d, dict) for d in found):
        return found
    return [{key: entry.get(key) for key in plan} for entry, plan in zip(found, planned)]
