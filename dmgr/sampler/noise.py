"""Where sampling noise comes from: per-sample generators, or recorded tensors replayed in order.

No global RNG is touched while sampling: every draw goes through one of these objects.

Random streams: every generator is built by `generator(key)` from an integer key: a seed itself (its x_T
noise) or a key derived from a seed by `stream_seed(seed, stream, index...)` (its plan, a retry, defect k,
...). Derived keys are a hash of (seed, stream, index) placed at 2**64 and above, so they never equal a seed
(seeds are below 2**63). torch's own `manual_seed` keeps 32 bits of a CPU generator's seed (seed 2**32
would repeat seed 0), so `generator` fills the Mersenne Twister's whole state from the key instead, with
numpy's SeedSequence: distinct keys give independent streams.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

DERIVED = 1 << 64  # derived stream keys are DERIVED + a 128-bit hash
MAX_SEED = (1 << 63) - 1  # seeds fit an int64 (and lie below every derived key)
_MT_WORDS = 624
_MT_OFFSET = 24  # torch's CPU generator state: initial seed u64, left i32, seeded i32, next u64, then the words u64


class NoiseSource(Protocol):
    def draw(self, like: torch.Tensor, role: str) -> torch.Tensor:
        """Standard normal noise shaped like `like`; `role` names the draw ("undo_x", "undo_crop", ...)."""
        ...


class PerSampleNoise:
    """One generator per sample: sample i's draws never depend on its batch-mates."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    def draw(self, like: torch.Tensor, role: str) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} but {len(self.generators)} generators")
        return torch.stack(
            [
                torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype).to(like.device)
                for g in self.generators
            ]
        )


class ReplayNoise:
    """Replays recorded draws per role, in order (used to reproduce a reference run)."""

    def __init__(self, **recorded: Sequence[torch.Tensor]):
        self.queues = {role: list(tensors) for role, tensors in recorded.items()}

    def draw(self, like: torch.Tensor, role: str) -> torch.Tensor:
        queue = self.queues.get(role)
        if not queue:
            raise RuntimeError(f"no recorded noise left for {role!r}")
        return queue.pop(0).reshape(like.shape).to(like)


def stream_seed(seed: int, stream: str, *index: int) -> int:
    """The key of a named side stream of `seed` (its plan, attempt a, defect k, ...): never a seed, and
    independent of the seed's own stream and of every other (seed, stream, index)."""
    text = repr((int(seed), str(stream), *(int(i) for i in index)))
    return DERIVED + int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "little")


def generator(key: int) -> torch.Generator:
    """A CPU generator whose whole Mersenne Twister state comes from `key` (any integer >= 0), as numpy
    seeds its own MT19937 from a SeedSequence."""
    if key < 0:
        raise ValueError(f"random stream key {key} is negative")
    words = np.random.SeedSequence(int(key)).generate_state(_MT_WORDS, np.uint32).astype("<u8")
    words[0] = 0x80000000  # the state is never all zeros
    return _generator_with_words(words, key & (DERIVED - 1))


def _generator_with_words(words: np.ndarray, initial_seed: int) -> torch.Generator:
    state = _fresh_state().numpy().copy()
    state[:8] = np.frombuffer(np.uint64(initial_seed).astype("<u8").tobytes(), np.uint8)
    state[_MT_OFFSET : _MT_OFFSET + 8 * _MT_WORDS] = np.frombuffer(words.tobytes(), np.uint8)
    g = torch.Generator()
    g.set_state(torch.from_numpy(state))
    return g


@functools.cache
def _fresh_state() -> torch.Tensor:
    """A freshly seeded generator's state, after checking that the words lie where `generator` writes them:
    the state of manual_seed(s) holds MT19937's initialisation of s there."""
    state = torch.Generator().manual_seed(5489).get_state()
    words = np.frombuffer(state.numpy().tobytes()[_MT_OFFSET : _MT_OFFSET + 8 * _MT_WORDS], "<u8")
    if not np.array_equal(words, mt19937_init(5489)):
        raise RuntimeError(f"torch {torch.__version__} stores its CPU generator state in a layout dmgr does not "
                           "know (dmgr.sampler.noise.generator): use the torch version of pyproject.toml")
    return state


def mt19937_init(seed: int) -> np.ndarray:
    """MT19937's standard initialisation of its 624 state words from a 32-bit seed (as std::mt19937)."""
    words = [seed & 0xFFFFFFFF]
    for i in range(1, _MT_WORDS):
        words.append((1812433253 * (words[-1] ^ (words[-1] >> 30)) + i) & 0xFFFFFFFF)
    return np.array(words, dtype="<u8")


def make_generators(keys: Sequence[int]) -> list[torch.Generator]:
    """One generator per key (a seed, or a stream_seed key): see `generator`."""
    return [generator(int(key)) for key in keys]


def initial_noise(
    generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """x_T for each sample from its own generator: shape is per sample, e.g. (3, 256, 256)."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device) for g in generators]).to(device)
