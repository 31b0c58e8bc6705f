"""Progress of long work: a bar on a terminal, a plain log line every N steps otherwise.

On a terminal (``stderr`` is a TTY) a :mod:`tqdm` bar shows the step, its rate and
ETA, and what the caller reports (reference calls, largest uncertainty,
temperature or fmax).  In a batch job or when the output is redirected the bar
is off and a log line with the same figures is written every ``every`` steps.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["Progress"]

log = logging.getLogger(__name__)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Report ``done`` of ``total`` steps.

    Parameters
    ----------
    total : int
        Steps expected (for the ETA).
    desc : str
        What is running (e.g. the stage name).
    every : int
        Steps between log lines when there is no terminal.
    bar : bool, optional
        Force the bar on or off (default: on when stderr is a terminal).
    start : int
        Steps already done (a resumed run).
    """

    def __init__(self, total: int, desc: str, every: int = 100, bar: bool | None = None,
                 start: int = 0) -> None:
        self.total, self.desc, self.every = int(total), desc, max(int(every), 1)
        self.start = self.done = int(start)
        self.t0 = time.monotonic()
        self._bar = None
        if sys.stderr.isatty() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.start, desc=desc, unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    def eta(self) -> float:
        """Seconds left at the rate of this session's steps (NaN before the first)."""
        rate = (self.done - self.start) / max(time.monotonic() - self.t0, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else float("nan")

    def update(self, done: int, **figures) -> None:
        """``done`` steps are complete; ``figures`` (name=value) are shown with them."""
        self.done = int(done)
        text = {k: (f"{v:.3g}" if isinstance(v, float) else str(v)) for k, v in figures.items()}
        if self._bar is not None:
            self._bar.set_postfix(text, refresh=False)
            self._bar.update(self.done - self._bar.n)
        elif self.done and (self.done % self.every == 0 or self.done == self.total):
            eta = self.eta()
            log.info("%s: step %d/%d, %s, ETA %s", self.desc, self.done, self.total,
                     ", ".join(f"{k} {v}" for k, v in text.items()),
                     "?" if eta != eta else _clock(eta))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
