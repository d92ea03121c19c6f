"""Per-seed random streams: every seed (any size below 2**63) and every stream of a seed (noise, plan,
attempts, defects, paste) draws its own independent numbers."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from dmgr import CONF_DIR
from dmgr.sampler import initial_noise, make_generators
from dmgr.schema import ConfigError
from dmgr.synth.config import parse_seeds, validate
from dmgr.synth.plan import SamplePlan, plan_sample, stream_seed

SEEDS = (0, 7, 2**32 - 1, 2**32, 2**32 + 7, 2**40, 2**63 - 1)


def draws(key: int, n: int = 32) -> tuple[int, ...]:
    return tuple(torch.randint(2**31, (n,), generator=make_generators([key])[0]).tolist())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    overrides = ["model=tiny_random", "dataset.source=generate", "screen.enabled=false",
                 f"out_dir={tmp_path_factory.mktemp('r') / 'run'}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return validate(compose(config_name="synth", overrides=overrides)).dataset


def test_seeds_beyond_32_bits_do_not_repeat_smaller_seeds(dataset):
    for seed in (0, 5, 2**32 - 1):
        bigger = seed + 2**32
        assert draws(seed) != draws(bigger)
        noise = initial_noise(make_generators([seed, bigger]), (3, 8, 8), "cpu")
        assert not torch.equal(noise[0], noise[1])
    assert [plan_sample(s, dataset) for s in range(16)] != [plan_sample(s + 2**32, dataset) for s in range(16)]


def test_the_plan_stream_is_not_the_noise_stream():
    from dmgr.synth.plan import plan_generator

    for seed in SEEDS:
        plan = tuple(torch.randint(2**31, (32,), generator=plan_generator(seed)).tolist())
        assert plan != draws(seed)
        assert plan == tuple(torch.randint(2**31, (32,), generator=plan_generator(seed)).tolist())


def test_every_stream_of_every_seed_is_its_own():
    keys = []
    for seed in SEEDS:
        keys += [SamplePlan(seed, (), attempt=a).noise_seed for a in range(4)]
        keys += [stream_seed(seed, "defect", k) for k in (1, 2)]
        keys += [stream_seed(seed, "paste"), stream_seed(seed, "plan")]
    assert len(set(keys)) == len(keys)
    assert all(k > 2**63 for k in keys if k not in SEEDS)  # derived keys are never a seed
    assert len({draws(k) for k in keys}) == len(keys)
    assert draws(keys[5]) == draws(keys[5])  # a key always gives the same stream


def test_the_generator_writes_torchs_own_state_layout():
    """Filling the state words with MT19937's initialisation of s reproduces torch's manual_seed(s)."""
    from dmgr.sampler.noise import _generator_with_words, mt19937_init

    for seed in (0, 1234, 2**32 - 1):
        ours, torchs = _generator_with_words(mt19937_init(seed), seed), torch.Generator().manual_seed(seed)
        assert torch.equal(torch.randn(100, generator=ours), torch.randn(100, generator=torchs))


@pytest.mark.parametrize("value", [2**63, [1, 2**64], f"{2**63 - 2}-{2**63 + 3}"])
def test_seeds_beyond_int64_are_refused_in_one_line(value):
    with pytest.raises(ConfigError, match=r"^seeds=.*at most 2\*\*63 - 1") as info:
        parse_seeds(value)
    assert "\n" not in str(info.value)
    assert list(parse_seeds(2**63 - 1)) == [2**63 - 1]
