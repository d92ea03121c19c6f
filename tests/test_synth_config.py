"""Every bad setting fails at start with one line naming the key; nothing is sampled."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from synth_support import TINY, run_synth

from dmgr import CONF_DIR
from dmgr.models import CheckpointError, build_unet, save_checkpoint
from dmgr.synth.config import ConfigError, parse_seeds, validate
from dmgr.synth.engine import load_engine
from dmgr.synth.plan import num_shards, plan_sample, shard_seeds, worker_index, worker_shards


def spec_of(overrides: list[str]):
    """Validate the job config; tiny random models on generated boards, no screen, unless the overrides say
    otherwise."""
    if not any(o.startswith("model=") for o in overrides):
        overrides = ["model=tiny_random", *overrides]
    if not any(o.startswith("dataset.source=") for o in overrides):
        overrides = ["dataset.source=generate", *overrides]
    if not any(o.startswith(("screen.", "~screen")) for o in overrides):
        overrides = ["screen.enabled=false", *overrides]  # on, it reads (or renders) the demo's patches
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return validate(compose(config_name="synth", overrides=overrides))


@pytest.fixture
def out(tmp_path):
    return f"out_dir={tmp_path / 'run'}"


@pytest.mark.parametrize(
    "override, key",
    [
        ("schedule.T_e=30", "schedule.T_e"),  # T_e >= T_s (fast: T_s=30)
        ("schedule.T_s=50", "schedule.T_s"),  # beyond the 50 respaced steps
        ("seeds=9-3", "seeds"),
        ("seeds=abc", "seeds"),
        ("seeds=-5", "seeds"),
        ("batch_size=0", "batch_size"),
        ("quality.classifier_steps=0", "quality.classifier_steps"),
        ("quality.enabled=maybe", "quality.enabled"),
        ("samples_per_shard=0", "samples_per_shard"),
        ("dataset.window_size=60", "dataset.window_size"),
        ("dataset.window_choice=fixed", "dataset.fixed_window"),
        ("dataset.class_choice=fixed", "dataset.fixed_class"),
        ("dataset.class_choice=weighted", "dataset.class_weights"),
        ("dataset.class_choice=sometimes", "dataset.class_choice"),
        ("mask.method=paint", "mask.method"),
        ("precision=fp8", "precision"),
        ("device=tpu", "device"),
        ("schedule.respacing=2000", "schedule.respacing"),
        ("+schedule.lr=1", "schedule.lr"),
        ("schedule.backtrack=1.5", "schedule.backtrack"),
        ("model.beta_schedule=quadratic", "model.beta_schedule"),
        ("model.local.config.num_classes=3", "model.local.config.num_classes"),
        ("model.global.config.image_size=32", "model.global.config.image_size"),
        ("array.task_id=2", "array.task_id"),
        ("dataset.source=files", "dataset.source"),
        ("dataset.defects_per_image=0", "dataset.defects_per_image"),
        ("dataset.defects_per_image=2", "dataset.defects_per_image"),  # generated boards carry one
        ("mask.pixels=both", "mask.pixels"),
        ("extras.input=true", "extras.input"),  # generated boards have no input image
        ("dataset.source=images dataset.images=tests/fixtures/voc/images extras.twin=true", "extras.twin"),
        ("model.local.config.in_channels=3 mask.method=local", "mask.method"),
        ("extras.crop=maybe", "extras.crop"),
        ("performance.compile=fast", "performance.compile"),
        ("performance.channels_last=maybe", "performance.channels_last"),
        ("performance.attention=flash", "performance.attention"),
        ("+model.local.config.num_head_channel=8", "model.local.config"),  # a typo in a random_init architecture
    ],
)
def test_bad_setting_names_its_key(override, key, out):
    with pytest.raises(ConfigError) as info:
        spec_of([*override.split(), out])
    message = str(info.value)
    assert message.startswith(f"{key}="), message
    assert "\n" not in message


def test_fixed_window_outside_the_image(out):
    with pytest.raises(ConfigError, match=r"^dataset.fixed_window=\[50, 50\]: the 16 px window must lie inside"):
        spec_of(["dataset.window_choice=fixed", "dataset.fixed_window=[50,50]", out])


def test_unknown_class_name(out):
    with pytest.raises(ConfigError, match="dataset.fixed_class='scratch'"):
        spec_of(["dataset.class_choice=fixed", "dataset.fixed_class=scratch", out])


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="^out_dir="):
        spec_of([f"out_dir={blocker / 'run'}"])


def test_missing_checkpoint(out):
    with pytest.raises(ConfigError, match="^model.global.checkpoint="):
        spec_of(["model=custom", "model.global.checkpoint=/nonexistent/global.safetensors", out])


def test_checkpoint_that_does_not_fit_the_config_is_a_clear_error(tmp_path, out):
    spec_base = spec_of([out])
    small = build_unet({**spec_base.model.global_net.config, "num_channels": 64})
    local = build_unet(spec_base.model.local_net.config)
    g_path = save_checkpoint(small, tmp_path / "g.safetensors")
    l_path = save_checkpoint(local, tmp_path / "l.safetensors")
    global_config = (
        "{"
        + ",".join(
            f"{k}:'{v}'" if isinstance(v, str) else f"{k}:{v}" for k, v in spec_base.model.global_net.config.items()
        )
        + "}"
    )
    spec = spec_of(
        [
            "model=custom",
            f"model.global.checkpoint={g_path}",
            f"model.local.checkpoint={l_path}",
            f"+model.global.config={global_config}",
            out,
        ]
    )
    with pytest.raises(CheckpointError) as info:
        load_engine(spec, torch.device("cpu"))
    assert "shape conflicts" in str(info.value) and "model.*" in str(info.value)


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = run_synth([*TINY, "schedule.T_e=8", "schedule.T_s=8", f"out_dir={tmp_path}"], check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["dmgr-synth: error: schedule.T_e=8: must be smaller than schedule.T_s=8"]
    assert not (tmp_path / "shards").exists()


@pytest.mark.slow
def test_a_run_dir_refuses_a_different_config(tmp_path):
    run_synth([*TINY, "seeds=0", f"out_dir={tmp_path}"])
    result = run_synth([*TINY, "seeds=0", "schedule.lr_xt=0.05", f"out_dir={tmp_path}"], check=False)
    assert result.returncode == 2 and "holds another run" in result.stderr


def test_out_dir_is_derived_from_the_config_not_the_clock(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    a, b = spec_of(["seeds=0-3"]), spec_of(["seeds=0-3", "batch_size=2", "device=cpu"])
    c = spec_of(["seeds=0-4"])
    assert a.out_dir == b.out_dir != c.out_dir
    assert a.out_dir.parent == tmp_path / "outputs"


def test_seed_forms():
    assert list(parse_seeds("0-3")) == [0, 1, 2, 3]
    assert list(parse_seeds(7)) == [7]
    assert parse_seeds([5, 2]) == [5, 2]
    huge = parse_seeds("0-999999999")  # stays a range: no billion-element list
    assert isinstance(huge, range) and len(huge) == 10**9
    assert list(shard_seeds(huge, 8, 124999999)) == list(range(999999992, 10**9))


def test_plans_depend_on_the_seed_alone(out):
    spec = spec_of([out])
    plans = [plan_sample(s, spec.dataset) for s in range(200)]
    assert plans[17] == plan_sample(17, spec.dataset)
    assert {p.class_name for p in plans} == set(spec.dataset.classes)
    xs = [p.window[0] for p in plans]
    assert min(xs) >= 5 and max(xs) < 64 - 16 - 5
    fixed = spec_of(
        [
            "dataset.class_choice=fixed",
            "dataset.fixed_class=short",
            "dataset.window_choice=fixed",
            "dataset.fixed_window=[3,4]",
            out,
        ]
    )
    assert {(p.class_name, p.window) for p in (plan_sample(s, fixed.dataset) for s in range(20))} == {("short", (3, 4))}
    weighted = spec_of(["dataset.class_choice=weighted", "dataset.class_weights=[0,0,1,0,0,3]", out])
    names = [plan_sample(s, weighted.dataset).class_name for s in range(400)]
    assert set(names) == {"opencircuit", "spuriouscopper"}
    assert 0.65 < names.count("spuriouscopper") / 400 < 0.85


def test_shards_split_the_same_way_for_ranks_and_array_tasks():
    blocks = [list(shard_seeds(range(10), 3, k)) for k in range(num_shards(10, 3))]
    assert blocks == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert list(worker_shards(4, 1, 2)) == [1, 3]
    # 2 array tasks x 2 ranks cover every shard exactly once
    owners = [worker_index(rank, 2, task, 2) for task in range(2) for rank in range(2)]
    covered = sorted(k for w, n in owners for k in worker_shards(9, w, n))
    assert covered == list(range(9))


def test_the_default_demo_model_describes_itself(out):
    spec = spec_of(["model=demo", out])
    assert spec.model.global_net.config["image_size"] == spec.dataset.image_size
    assert spec.model.local_net.config["num_classes"] == len(spec.dataset.classes)


def test_side_streams_draw_other_noise_than_the_seed():
    from dmgr.sampler import make_generators
    from dmgr.synth.plan import stream_seed

    def draws(seed: int) -> torch.Tensor:
        return torch.randn(8, generator=make_generators([seed])[0])

    for seed in (0, 7, 2**33 + 5):
        streams = [seed, stream_seed(seed, "defect", 1), stream_seed(seed, "defect", 2), stream_seed(seed, "paste")]
        assert len({tuple(draws(s).tolist()) for s in streams}) == 4
        assert stream_seed(seed, "defect", 1) == stream_seed(seed, "defect", 1) >= 0


def test_performance_settings_enter_the_identity_only_when_not_default(out):
    default = spec_of([out])
    assert spec_of([out, "performance.compile=false"]).identity == default.identity  # false is off
    assert spec_of([out, "performance.attention=auto"]).identity == default.identity
    changed = spec_of([out, "performance.channels_last=true", "performance.compile=reduce-overhead"])
    assert changed.identity != default.identity
    assert (changed.performance.channels_last, changed.performance.compile) == (True, "reduce-overhead")


def test_local_mask_smoothing_enters_the_identity_only_when_on(out):
    default = spec_of([out])
    assert "local_sigma" not in default.identity_inputs["mask"]  # runs made before the setting resume
    assert spec_of([out, "mask.local_sigma=0"]).identity == default.identity
    smoothed = spec_of([out, "mask.local_sigma=1"])
    assert smoothed.identity != default.identity and smoothed.mask.local_sigma == 1.0
    with pytest.raises(ConfigError, match="mask.local_sigma"):
        spec_of([out, "mask.local_sigma=-1"])


def test_extras_name_every_member_a_sample_holds(out):
    spec = spec_of([out, "extras.crop=true", "extras.masks=true", "extras.paste=true", "extras.twin=true"])
    assert spec.extras.members(spec.available_masks) == (
        "png", "mask.png", "json", "crop.png", "twin.png",
        *(f"mask_{m}.png" for m in spec.available_masks), "paste.png", "paste_mask.png",
    )
    assert spec_of([out]).extras.members(("diff",)) == ("png", "mask.png", "json")
