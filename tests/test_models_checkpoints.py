"""Checkpoint files: the project's safetensors with config metadata, published .pt state dicts, clear errors."""

import hashlib
import json

import pytest
import torch
from conftest import LOCAL_CONFIG
from safetensors import safe_open

from dmgr.models import CheckpointError, file_digest, load_unet, read_checkpoint, save_checkpoint


@pytest.fixture
def model(unet_factory):
    return unet_factory(7, **LOCAL_CONFIG)


def outputs(model):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x, torch.tensor([3, 700]), torch.tensor([1, 5]))


def test_safetensors_round_trip(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "sub" / "local.safetensors", metadata={"note": "tiny"})
    assert path.is_file()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["dmgr.unet_config"])["num_classes"] == 6
    assert meta["note"] == "tiny"
    loaded = load_unet(path)  # the architecture comes from the file
    assert loaded.config == model.config
    assert not loaded.training
    assert torch.equal(outputs(loaded), outputs(model))
    state, config, _ = read_checkpoint(path)
    assert config == model.config
    assert state.keys() == model.state_dict().keys()


def test_published_pt_state_dict_with_given_config(model, tmp_path):
    path = tmp_path / "published.pt"
    torch.save(model.state_dict(), path)
    loaded = load_unet(path, LOCAL_CONFIG)
    assert torch.equal(outputs(loaded), outputs(model))
    with pytest.raises(CheckpointError, match="stores no architecture"):
        load_unet(path)


def checkpoint_error(model, tmp_path, **changes):
    path = tmp_path / "published.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_unet(path, {**LOCAL_CONFIG, **changes})
    message = str(info.value)
    assert "Traceback" not in message and "\n" not in message
    assert str(path) in message
    return message


def test_wrong_width_names_shape_conflicts(model, tmp_path):
    message = checkpoint_error(model, tmp_path, num_channels=64)
    assert "shape conflicts" in message
    assert "time_embed.0.weight" in message or "input_blocks.0.0.weight" in message


def test_missing_class_embedding_is_an_unexpected_key(model, tmp_path):
    message = checkpoint_error(model, tmp_path, num_classes=None)
    assert "unexpected keys" in message and "label_emb.weight" in message


def test_extra_res_blocks_are_missing_keys(model, tmp_path):
    message = checkpoint_error(model, tmp_path, num_res_blocks=2)
    assert "missing keys" in message


def test_learn_sigma_mismatch(model, tmp_path):
    message = checkpoint_error(model, tmp_path, learn_sigma=False)
    assert "out.2.weight" in message


@pytest.mark.parametrize("name", ["absent.pt", "absent.safetensors"])
def test_nonexistent_path(tmp_path, name):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_unet(tmp_path / name, LOCAL_CONFIG)


@pytest.mark.parametrize("name", ["corrupt.pt", "corrupt.safetensors"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_unet(path, LOCAL_CONFIG)


def test_truncated_safetensors(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "full.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_unet(cut)


def test_pt_holding_no_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError):
        load_unet(path, LOCAL_CONFIG)


def test_file_digest(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"dmgr" * 1000)
    assert file_digest(path) == hashlib.sha256(b"dmgr" * 1000).hexdigest()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_non_floating_tensors_are_refused_naming_file_tensor_and_dtype(model, tmp_path, suffix, dtype):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["out.2.weight"] = state["out.2.weight"].to(dtype)
    path = tmp_path / f"int{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"dmgr.unet_config": json.dumps(model.config.to_dict())})
    with pytest.raises(CheckpointError) as info:
        load_unet(path, LOCAL_CONFIG)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "out.2.weight" in message and str(dtype).removeprefix("torch.") in message


def test_a_typo_in_a_stored_config_is_refused_naming_the_key(model, tmp_path):
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config["num_head_channel"] = config.pop("num_head_channels")
    path = tmp_path / "typo.safetensors"
    save_file(dict(model.state_dict()), str(path), metadata={"dmgr.unet_config": json.dumps(config)})
    with pytest.raises(CheckpointError, match=r"typo.safetensors.*'num_head_channel'.*'num_head_channels'"):
        load_unet(path)
