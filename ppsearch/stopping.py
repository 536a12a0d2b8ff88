"""How a command stops on SIGINT and SIGTERM (what a cluster scheduler sends): the first signal
winds down (a checkpoint, trials cancelled or finished), a second stops at once."""
from __future__ import annotations

import signal
from typing import Callable


def handle_stop_signals(first: Callable[[str], None], stopping: Callable[[], bool]) -> dict:
    """SIGINT and SIGTERM as a command stops on them: the first calls ``first(name)`` (wind down);
    one that comes while ``stopping()`` raises KeyboardInterrupt (stop at once). Returns the
    handlers it replaced."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stopping():
            raise KeyboardInterrupt(name)
        first(name)
    return {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
