"""A graceful stop on SIGINT (Ctrl-C) and SIGTERM (what schedulers send before preemption).

While :class:`StopSignals` is active, the first SIGINT or SIGTERM only records itself: the
training loop finishes the step it is in, saves a checkpoint and returns, and ``train.py`` exits
with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second signal exits at once, like a
kill: the last complete checkpoint still resumes. In a multi-host run the processes agree
after every step (:meth:`StopSignals.agreed`), so all of them stop at the same step even if only
one got the signal.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import numpy as np

__all__ = ["SIGNALS", "StopSignals"]

#: The signals that stop a run gracefully.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Records SIGINT/SIGTERM while active (a context manager); a second one exits at once.

    Outside the main thread (where Python cannot install handlers) it does nothing.

    Attributes:
      signum: the first signal received, or None.

    Example:
      >>> import os, signal
      >>> with StopSignals(quiet=True) as stop:
      ...     os.kill(os.getpid(), signal.SIGTERM)
      ...     stop.requested, stop.name, stop.exit_code
      (True, 'SIGTERM', 143)
    """

    def __init__(self, *, quiet: bool = False) -> None:
        self.signum: int | None = None
        self._quiet = quiet
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\n{name} again: exiting now; the last complete checkpoint "
                        "resumes.\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        if not self._quiet:
            os.write(2, f"\n{name}: stopping after the current step (saving first); "
                        "press Ctrl-C again to exit at once.\n".encode())

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived in this process."""
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """``"SIGINT"`` or ``"SIGTERM"`` (None before any signal)."""
        return None if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """``128 + signal``: what a shell reports for a process ended by that signal."""
        return 0 if self.signum is None else 128 + self.signum

    def agreed(self, process_count: int) -> bool:
        """Whether any process of the run got a signal (every process must call it).

        With one process this is :attr:`requested`; with several, one tiny all-gather per
        call, and a process that got no signal of its own takes the first one seen.

        Example:
          >>> StopSignals().agreed(1)
          False
        """
        if process_count == 1:
            return self.requested
        from jax.experimental import multihost_utils

        got = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0)))
        if self.signum is None and got.max() > 0:
            self.signum = int(got[got > 0][0])
        return self.signum is not None
