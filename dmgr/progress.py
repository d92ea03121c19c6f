"""Progress for terminals and for logs: a tqdm bar when the stream is a terminal, else a plain line at most
every `every` seconds and one at the end, so Slurm and `> log` files get readable lines, not one line of
carriage-return updates per step."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

LOG_EVERY_SECONDS = 30.0


class LogProgress:
    """The part of tqdm's interface the project uses (iterate, update, set_postfix, close, n, total),
    written as whole lines."""

    def __init__(self, iterable: Iterable | None, total: float | None, desc: str, unit: str, initial: int,
                 leave: bool, file: IO[str], every: float) -> None:
        self.iterable = iterable
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.desc, self.unit, self.leave, self.file, self.every = desc, unit, leave, file, every
        self.n = self.initial = initial
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.printed = self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._write(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values: Any) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        """The closing line: at the end when the bar is to be kept (leave), and whenever a line was already
        written (then also when stopped early, e.g. by Ctrl-C)."""
        if self.closed:
            return
        self.closed = True
        complete = not self.total or self.n >= self.total
        if self.printed or (complete and self.leave):
            self._write(time.monotonic(), " done" if complete else " stopped")

    def line(self, now: float, suffix: str = "") -> str:
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        parts = [f"{self.desc + ': ' if self.desc else ''}{count} {self.unit}{suffix}"]
        if self.total:
            parts.append(f"{100 * self.n / self.total:.0f}%")
        parts.append(f"{_clock(elapsed)} elapsed")
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"{_clock((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _write(self, now: float, suffix: str = "") -> None:
        self.printed = True
        print(self.line(now, suffix), file=self.file, flush=True)


ProgressBar = tqdm | LogProgress


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, leave: bool = True, initial: int = 0, position: int | None = None,
             file: IO[str] | None = None, every: float = LOG_EVERY_SECONDS) -> ProgressBar:
    """tqdm(iterable, total=..., desc=..., ...) on a terminal; elsewhere a LogProgress with the same use.
    `file` defaults to stderr, where tqdm writes."""
    stream = file if file is not None else sys.stderr
    if disable or _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, initial=initial,
                    position=position, file=stream)
    return LogProgress(iterable, total, desc, unit, initial, leave, stream, every)


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _length(iterable: Iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
