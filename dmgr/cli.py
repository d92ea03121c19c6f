"""What every command-line entry point shares: Ctrl-C (SIGINT) ends it with one line and exit status 130,
the shell's code for a SIGINT, instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

INTERRUPTED = 130  # 128 + SIGINT


def stop_on_interrupt(prog: str, hint: str = "") -> Callable[[F], F]:
    """Decorate a CLI's main: KeyboardInterrupt prints `PROG: interrupted (Ctrl-C)[; HINT]` on stderr and
    exits 130. Under @hydra.main it goes below it, on the task function."""

    def decorate(main: F) -> F:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                interrupted(prog, hint)

        return run  # type: ignore[return-value]

    return decorate


def interrupted(prog: str, hint: str = "") -> None:
    """The one line and exit status of a Ctrl-C."""
    print(f"{prog}: interrupted (Ctrl-C){'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)
