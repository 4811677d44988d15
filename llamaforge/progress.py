"""Progress of a long loop: a tqdm bar on a terminal, plain lines where output goes to a file or a pipe.

tqdm draws nothing when its stream is not a terminal (with `disable=None`), so a job whose output is logged
was silent until it ended. There a line is printed instead at the first update, at each tenth of the total,
at the end, and whenever LINE_EVERY_S seconds have passed since the last line:

    step 40/200 (20%), loss 1.234, lr 1.98e-04, tok/s 12,345, 3.21 step/s, elapsed 0:12, ETA 0:50
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LINE_EVERY_S = 10.0


class ProgressBar:
    """`total` units of work, `initial` of them done already; `update` adds some and shows the fields given."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 file: TextIO | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.file = file or sys.stderr
        self.bar = None
        self.lines = False
        if not enabled or total == 0:  # a bar for no work at all ("loglikelihood: 0req") says nothing
            return
        if _is_terminal(self.file):
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.file)
        else:
            self.lines = True
            self.started = time.monotonic()
            self.last_line = None

    def update(self, n: int = 1, **fields: str) -> None:
        """Count n more units done; fields (already formatted: loss="1.234") go on the bar or the line."""
        self.n += n
        if self.bar is not None:
            if fields:
                self.bar.set_postfix(fields, refresh=False)
            self.bar.update(n)
        elif self.lines and self._line_due(n):
            self.last_line = time.monotonic()
            self.write(self.line(fields))

    def _line_due(self, n: int) -> bool:
        tenth = max(1, self.total // 10)
        crossed_tenth = (self.n // tenth) != ((self.n - n) // tenth)
        overdue = self.last_line is not None and time.monotonic() - self.last_line >= LINE_EVERY_S
        return self.last_line is None or crossed_tenth or self.n >= self.total or overdue

    def line(self, fields: dict[str, str]) -> str:
        """The plain line of the current state: count, percent, fields, rate, elapsed time and ETA."""
        elapsed = time.monotonic() - self.started
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else None
        parts = [f"{self.desc} {self.n}/{self.total} ({100 * self.n // self.total}%)",
                 *(f"{name} {value}" for name, value in fields.items()),
                 f"{rate:.3g} {self.unit}/s" if rate < 1000 else f"{rate:,.0f} {self.unit}/s",
                 f"elapsed {clock(elapsed)}", f"ETA {clock(eta) if eta is not None else '?'}"]
        return ", ".join(parts)

    def write(self, text: str) -> None:
        """A line of text that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.file)
        elif self.lines:
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def clock(seconds: float) -> str:
    """0:07, 12:34 or 1:02:03."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
