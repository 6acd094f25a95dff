"""Progress bars that stay readable in files.

On a terminal ``progress`` draws a tqdm bar. Anywhere else (a SLURM job log, ``ray job logs``,
``ia2dist run ... > log 2>&1``) a bar redrawn twice a second would fill the file with carriage
returns, so it writes plain lines instead: with ``each=True`` (coarse units such as training jobs)
one line per completed item, otherwise at most one line every ``interval_s`` seconds (30) while it
advances plus one when it closes, and nothing at all for a bar that closes within ``interval_s``.
Lines go through the ``ia2dist`` logger when it has handlers (the command line's: stderr and
run_dir/run.log), else to the stream.

tqdm draws the bar; it has no mode that writes bounded plain lines to a file (``mininterval``
still writes a redraw per interval and never says what finished), hence this small wrapper.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO

log = logging.getLogger("ia2dist.progress")

#: Seconds between two lines of a bar written to a file.
INTERVAL_S = 30.0


def progress(total: int | None, desc: str, unit: str = "it", *, enabled: bool = True,
             each: bool = False, leave: bool = True, interval_s: float = INTERVAL_S,
             stream: IO[str] | None = None):
    """A progress bar over ``total`` items of ``unit`` labelled ``desc``: a tqdm bar on a terminal
    ``stream`` (default stderr), bounded lines elsewhere (see the module docstring), nothing when
    not ``enabled``. The object has ``update(n)``, ``set_postfix(**values)``, ``close()``, a
    settable ``total`` and works as a context manager. ``leave=False`` clears a terminal bar when
    it closes. With an explicit ``stream`` lines go to it, never to the logger."""
    if not enabled:
        return _Off()
    target = stream if stream is not None else sys.stderr
    if _isatty(target):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=target)
    return LineProgress(total, desc, unit, each=each, interval_s=interval_s, stream=stream)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class LineProgress:
    """The file form of ``progress``: plain lines, bounded in number."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, each: bool = False,
                 interval_s: float = INTERVAL_S, stream: IO[str] | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.each, self.interval_s, self.stream = each, interval_s, stream
        self.n = 0
        self.postfix = ""
        self.start = self._last = time.monotonic()
        self._written_n: int | None = None
        self._closed = False

    def update(self, n: int = 1) -> None:
        if not n:
            return
        self.n += n
        now = time.monotonic()
        if self.each or now - self._last >= self.interval_s:
            self._write(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        # a bar that wrote nothing and closed within one interval stays silent
        if self._written_n is not None and self._written_n != self.n:
            self._write(now)

    def line(self, now: float | None = None) -> str:
        from tqdm import tqdm

        elapsed = (now if now is not None else time.monotonic()) - self.start
        if self.total:
            done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
            left = ""
            if 0 < self.n < self.total:
                left = f", ~{tqdm.format_interval(elapsed * (self.total - self.n) / self.n)} left"
        else:
            done, left = f"{self.n} {self.unit}", ""
        text = f"{self.desc}: {done}, {tqdm.format_interval(elapsed)} elapsed{left}"
        return f"{text}, {self.postfix}" if self.postfix else text

    def _write(self, now: float) -> None:
        self._last, self._written_n = now, self.n
        text = self.line(now)
        if self.stream is None and log.hasHandlers():
            log.info(text)
        else:
            stream = self.stream if self.stream is not None else sys.stderr
            stream.write(f"{time.strftime('%H:%M:%S')} {text}\n")
            stream.flush()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Off:
    """A disabled bar."""

    total = None

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc) -> None:
        pass
