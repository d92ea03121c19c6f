"""The sequence of indices a sampler visits, optionally with RePaint-style time travel."""

from __future__ import annotations


def time_walk(num_steps: int, time_travel: bool = False, jump_length: int = 10, jump_n_sample: int = 2) -> list[int]:
    """Indices from num_steps - 1 down to 0.

    With time travel, at every index j = 0, jump_length, ... below num_steps - jump_length the walk
    goes back up `jump_length` indices and down again, `jump_n_sample - 1` times.
    A consecutive pair (a, b) is a reverse step when b < a and an undo when b = a + 1.
    """
    if not time_travel:
        return list(range(num_steps - 1, -1, -1))
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    walk, t = [], num_steps
    while t >= 1:
        t -= 1
        walk.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                walk.append(t)
    return walk
