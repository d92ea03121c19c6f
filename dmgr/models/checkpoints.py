"""Checkpoint files: published guided-diffusion `.pt` state dicts and the project's safetensors.

The project format is a safetensors file whose metadata holds the UNet config as JSON
(`dmgr.unet_config`), so a checkpoint describes itself.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dmgr.digest import sha256_file
from dmgr.models.unet import UNetConfig, UNetConfigError, UNetModel, build_unet

CONFIG_KEY = "dmgr.unet_config"
SCALE_KEY = "dmgr.scale"  # model pixels per image pixel the network was trained at (dmgr.train's `scale`)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model config."""


def save_checkpoint(model: UNetModel, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {CONFIG_KEY: json.dumps(model.config.to_dict())}
    meta.update(metadata or {})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], UNetConfig | None, dict[str, str]]:
    """(state_dict, config stored in the file or None, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the model.*.checkpoint setting")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            return state, _stored_config(meta, path), meta
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:  # torch's message advises weights_only=False: never for untrusted files
        if "global" in str(exc):  # a pickled Python object (class, function), refused by the weights-only reader
            raise CheckpointError(
                f"checkpoint {path} is not a plain state dict (it pickles Python objects, which are never "
                "loaded): save it with torch.save(model.state_dict(), path)"
            ) from None
        if path.read_bytes()[:1] == b"\x80":  # a pickle stream (pickle.dump), not torch.save's zip archive
            raise CheckpointError(
                f"checkpoint {path} is a plain pickle, refused: loading a pickle can run code, so only torch.save "
                "state dicts are read; save it with torch.save(model.state_dict(), path) or as .safetensors"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch.save file or damaged") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear line
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        config = _config(obj["config"], path) if isinstance(obj.get("config"), dict) else None
        return obj["state_dict"], config, {}
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj, None, {}


def stored_metadata(path: str | Path) -> tuple[UNetConfig | None, dict[str, str]]:
    """(architecture, metadata) stored in a project checkpoint (reads no tensors); (None, {}) for `.pt`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    return _stored_config(meta, path), meta


def recorded_scale(meta: dict[str, str], path: str | Path) -> float | None:
    """The scale a checkpoint was trained at, from its metadata; None when it records none (the paper models,
    checkpoints trained before the key existed): unknown."""
    if SCALE_KEY not in meta:
        return None
    try:
        value = float(meta[SCALE_KEY])
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise CheckpointError(f"checkpoint {path}: metadata {SCALE_KEY}={meta[SCALE_KEY]!r} is not a scale > 0: "
                              "the file is damaged; retrain or remove the key")
    return value


def _stored_config(meta: dict[str, str], path: Path) -> UNetConfig | None:
    return _config(json.loads(meta[CONFIG_KEY]), path) if CONFIG_KEY in meta else None


def _config(data: dict, path: str | Path) -> UNetConfig:
    try:
        return UNetConfig.from_dict(data)
    except UNetConfigError as exc:
        raise CheckpointError(f"checkpoint {path} stores an architecture that cannot be used: {exc}") from None


def stored_config(path: str | Path) -> UNetConfig | None:
    """The architecture stored in a project checkpoint's metadata (reads no tensors), else None."""
    return stored_metadata(path)[0]


def check_fit(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise one CheckpointError naming missing keys, unexpected keys and shape conflicts.

    A strict load_state_dict finds the same three, but its error lists every key on a line of its own (21 kB
    for a width change on a tiny UNet) with no hint what to change: this counts each kind and names five.
    """
    own = model.state_dict()
    check_dtypes(own, state, path)
    found = {
        "missing keys": sorted(own.keys() - state.keys()),
        "unexpected keys": sorted(state.keys() - own.keys()),
        "shape conflicts": [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ],
    }
    parts = [
        f"{len(items)} {kind}: {', '.join(items[:5])}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        for kind, items in found.items()
        if items
    ]
    if parts:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model config: {'; '.join(parts)}. "
            f"Fix the architecture settings under model.* to match the checkpoint{_null_class_hint(own, state)}."
        )


def _null_class_hint(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """A label embedding one row longer on one side: the null class of a model trained with label dropout."""
    key = "label_emb.weight"
    if key not in own or key not in state:
        return ""
    extra = state[key].shape[0] - own[key].shape[0]
    return {1: " (it has a null class: null_class: true)", -1: " (it has no null class: null_class: false)"}.get(
        extra, "")


def check_dtypes(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise one CheckpointError for the first checkpoint tensor that is not floating point where the model's is:
    load_state_dict would cast it silently (int32 bits read as numbers give a model that computes garbage)."""
    for key, value in state.items():
        if key in own and own[key].is_floating_point() and not value.is_floating_point():
            dtype = str(value.dtype).removeprefix("torch.")
            raise CheckpointError(
                f"checkpoint {path}: tensor {key} is {dtype}, not floating point: the file is damaged or holds "
                "something other than model weights; save the model's float state_dict"
            )


def load_unet(
    path: str | Path, config: UNetConfig | dict | None = None, device: torch.device | str = "cpu"
) -> UNetModel:
    """Build the UNet from `config` (or the config stored in the file) and load the weights strictly."""
    state, stored, _ = read_checkpoint(path)
    config = config if config is not None else stored
    if config is None:
        raise CheckpointError(f"checkpoint {path} stores no architecture: give the model config")
    try:
        model = build_unet(config)
    except UNetConfigError as exc:
        raise CheckpointError(f"the architecture given for checkpoint {path}: {exc}") from None
    check_fit(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


file_digest = sha256_file  # a checkpoint's digest, as recorded in sample metadata
