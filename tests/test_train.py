"""The training command on a tiny model and a tiny exported dataset; the shipped demo checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dmgr import CONF_DIR
from dmgr.data import export_global, export_local
from dmgr.diffusion import make_diffusion
from dmgr.models import load_unet, read_checkpoint
from dmgr.sampler import DMGRSettings, PerSampleNoise, dmgr_sample, initial_noise, make_generators
from dmgr.train import TrainConfigError, train

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` leaves the module out

ROOT = Path(__file__).resolve().parents[1]
TINY_GLOBAL = "{image_size: 32, num_channels: 32, num_res_blocks: 1, channel_mult: '1,2', attention_resolutions: '16', num_heads: 2, learn_sigma: true, resblock_updown: true}"  # noqa: E501
TINY_LOCAL = "{image_size: 8, num_channels: 32, num_res_blocks: 1, channel_mult: '1,2', attention_resolutions: '4', num_heads: 2, learn_sigma: true, resblock_updown: true, num_classes: 6}"  # noqa: E501


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pcb")
    export_global(root, 32, 16, seed=0, progress=False)
    export_local(root, 32, 4, seed=0, progress=False)
    return root


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="train", overrides=overrides)


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]


def common(data_root: Path, out: Path) -> list[str]:
    return [f"data_root={data_root}", f"out_dir={out}", "log_every=1", "sample_every=1000", "sample_steps=3",
            "progress=false", "batch_size=8"]


def test_a_few_steps_reduce_the_loss_and_resume(data_root, tmp_path):
    out = tmp_path / "global"
    overrides = ["arch=demo_global", f"arch.config={TINY_GLOBAL}", "lr=2e-3", *common(data_root, out)]
    train(config([*overrides, "steps=30", "save_every=30"]))
    log = losses(out)
    assert len(log) == 30
    first = sum(r["mse"] for r in log[:5]) / 5
    last = sum(r["mse"] for r in log[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert all("vb" in r for r in log), "learned sigma trains with the hybrid loss"
    assert (out / "samples" / "step-0000030.png").exists()

    train(config([*overrides, "steps=33", "save_every=100"]))  # resumes from step 30
    assert [r["step"] for r in losses(out)][-3:] == [31, 32, 33]
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 33

    # The EMA checkpoint describes itself and loads as it is, like the synthesis job loads it.
    state, stored, meta = read_checkpoint(out / "ema.safetensors")
    assert stored is not None and stored.image_size == 32 and meta["dmgr.step"] == "33"
    ema = load_unet(out / "ema.safetensors")
    reference = torch.load(out / "state.pt", weights_only=True)["ema"]
    for name, tensor in ema.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_local_model_trains_class_conditionally(data_root, tmp_path):
    out = tmp_path / "local"
    train(config(["arch=demo_local", f"arch.config={TINY_LOCAL}", "steps=3", "save_every=3",
                  *common(data_root, out)]))
    model = load_unet(out / "ema.safetensors")
    assert model.num_classes == 6
    meta = read_checkpoint(out / "ema.safetensors")[2]
    assert json.loads(meta["dmgr.classes"])[3] == "short"


def test_label_dropout_trains_the_null_class_and_previews_guided(data_root, tmp_path):
    out = tmp_path / "guided"
    train(config(["arch=demo_local", f"arch.config={TINY_LOCAL}", "+arch.config.null_class=true", "steps=2",
                  "save_every=2", "label_dropout=0.5", "sample_guidance=2", *common(data_root, out),
                  "sample_every=2"]))
    model = load_unet(out / "ema.safetensors")
    assert model.config.null_class and model.label_emb.weight.shape[0] == 7
    assert (out / "samples" / "step-0000002.png").exists()


def test_bad_training_settings_name_the_key(data_root, tmp_path):
    with pytest.raises(TrainConfigError, match="^data_root="):
        train(config([f"data_root={tmp_path / 'nowhere'}"]))
    with pytest.raises(TrainConfigError, match="^ema_rate="):
        train(config(["ema_rate=1.5", *common(data_root, tmp_path)]))


def test_ddp_under_torchrun(data_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dmgr.train",
           "arch=demo_global", f"arch.config={TINY_GLOBAL}", "steps=2", "save_every=2", *common(data_root, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["step"] for r in losses(out)] == [1, 2]
    assert load_unet(out / "ema.safetensors").config.image_size == 32


DEMO = ROOT / "checkpoints" / "demo"


def test_demo_checkpoints_load_and_sample():
    global_model = load_unet(DEMO / "global.safetensors")
    local_model = load_unet(DEMO / "local.safetensors")
    assert global_model.config.image_size == 4 * local_model.config.image_size
    assert local_model.num_classes == 6
    size, window = global_model.config.image_size, local_model.config.image_size
    generators = make_generators([0, 1])
    x_T = initial_noise(generators, (3, size, size), "cpu")
    settings = DMGRSettings(T_s=6, T_e=2, time_travel=False, gate_radius=9 * window / 64, gate_every=1)
    result = dmgr_sample(global_model, local_model, make_diffusion(1000, "linear", "10"), x_T,
                         torch.tensor([[10, 12], [30, 20]]), torch.tensor([0, 3]), window, settings,
                         PerSampleNoise(generators))
    assert result.image.shape == (2, 3, size, size)
    assert torch.isfinite(result.image).all() and result.image.abs().max() <= 1.5
    assert (result.final_loss > 0).all()


def tiny_global(data_root: Path, out: Path) -> list[str]:
    return ["arch=demo_global", f"arch.config={TINY_GLOBAL}", *common(data_root, out)]


def test_sigterm_saves_and_the_rerun_resumes_from_that_step(data_root, tmp_path):
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "dmgr.train", *tiny_global(data_root, out), "steps=100000", "save_every=100000",
           "save_every_minutes=null"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / "loss.jsonl").exists() and len(losses(out)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    saved = torch.load(out / "state.pt", weights_only=True)["step"]
    assert saved == losses(out)[-1]["step"] >= 3
    assert f"stopped by SIGTERM at step {saved}" in err.strip().splitlines()[-1]
    assert read_checkpoint(out / "ema.safetensors")[2]["dmgr.step"] == str(saved)

    train(config([*tiny_global(data_root, out), f"steps={saved + 2}"]))
    assert [r["step"] for r in losses(out)][-3:] == [saved, saved + 1, saved + 2]
    assert torch.load(out / "state.pt", weights_only=True)["step"] == saved + 2


def test_saves_by_the_clock_and_warns_when_save_every_exceeds_steps(data_root, tmp_path, monkeypatch, caplog):
    import dmgr.train as training

    saves = []
    monkeypatch.setattr(training, "save_all", lambda *args: saves.append(args[5]))
    with caplog.at_level("WARNING", logger="dmgr.train"):
        train(config([*tiny_global(data_root, tmp_path), "steps=3", "save_every=500", "save_every_minutes=1e-9"]))
    assert saves == [1, 2, 3]
    assert any("save_every=500 is larger than steps=3" in r.getMessage() for r in caplog.records)


def test_resume_into_a_run_on_other_data_or_architecture_is_refused(data_root, tmp_path):
    out = tmp_path / "run"
    train(config([*tiny_global(data_root, out), "steps=2"]))
    other = tmp_path / "other"
    (other / "global").mkdir(parents=True)
    for path in sorted((data_root / "global").glob("*.png"))[:4]:
        (other / "global" / path.name).write_bytes(path.read_bytes())
    cmd = [sys.executable, "-m", "dmgr.train", *tiny_global(other, out), "steps=4"]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert f"data_root: {data_root.resolve()} in the saved run, {other.resolve()} in this one" in line
    with pytest.raises(TrainConfigError, match=r"arch.config.num_channels: 32 in the saved run, 16 in this one"):
        train(config([*tiny_global(data_root, out), "steps=4", "arch.config.num_channels=16"]))
    assert [r["step"] for r in losses(out)] == [1, 2]
    train(config([*tiny_global(data_root, out), "steps=3"]))  # the same run resumes
    assert [r["step"] for r in losses(out)] == [1, 2, 3]


@pytest.mark.parametrize("content", [b"", b"not a torch file" * 10, b"PK\x03\x04" + bytes(100)])
def test_an_unreadable_state_file_is_named_in_one_line(data_root, tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.pt").write_bytes(content)
    with pytest.raises(TrainConfigError) as info:
        train(config([*tiny_global(data_root, out), "steps=2"]))
    message = str(info.value)
    assert "\n" not in message and str(out / "state.pt") in message and "delete it" in message


def test_resuming_with_fewer_steps_than_done_is_refused(data_root, tmp_path):
    out = tmp_path / "run"
    train(config([*tiny_global(data_root, out), "steps=3"]))
    with pytest.raises(TrainConfigError, match=r"steps=2: .*already at step 3") as info:
        train(config([*tiny_global(data_root, out), "steps=2"]))
    assert "\n" not in str(info.value)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 3
    train(config([*tiny_global(data_root, out), "steps=3"]))  # the finished run's command again: nothing to do


def test_a_typo_in_the_architecture_is_refused(data_root, tmp_path):
    with pytest.raises(TrainConfigError, match=r"'num_head_channel'.*did you mean 'num_head_channels'"):
        train(config([*tiny_global(data_root, tmp_path / "run"), "steps=2", "+arch.config.num_head_channel=8"]))
