"""The project's one logging setup, and progress reporting.

Every entry point calls `setup_logging` once. Long work reports progress through
`progress(...)` (an iterable wrapper) or a `Progress` object (for loops that are not
iterables, such as training): on a terminal that is a tqdm bar; under `arcface run`
(ARCFACE_PROGRESS=events) it is a line `@@arcface-progress {json}` on stdout, at most about
once a second, which `arcface run` turns into one bar per phase in the user's terminal while
everything else goes to the phase's log file. The line carries no secrets: a label, counts
and a few figures.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
EVENT = "@@arcface-progress "
RESULT = "@@arcface-result "


def setup_logging(level: str | int | None = None) -> None:
    level = level or os.environ.get("ARCFACE_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if getattr(root, "_arcface_configured", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    # Chatty third-party loggers stay at WARNING unless we are debugging.
    if logging.getLevelName(root.level) != "DEBUG":
        for name in ("urllib3", "botocore", "boto3", "s3transfer", "matplotlib", "PIL", "distributed", "dask",
                     "mlflow", "onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.WARNING)
    root._arcface_configured = True  # type: ignore[attr-defined]


def _mode() -> str:
    """"events" under `arcface run`; "off" when disabled (tests); else "auto" (a bar on a terminal)."""
    value = os.environ.get("ARCFACE_PROGRESS", "auto")
    return {"0": "off", "events": "events"}.get(value, "auto")


class Progress:
    """Progress of one piece of long work: `update(n, **figures)`; `close()` at the end."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", every_s: float = 1.0):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.n, self.figures, self._last, self._printed_n = 0, {}, 0.0, 0
        self._started = time.monotonic()
        self._mode = _mode()
        self._bar = None
        if self._mode == "auto" and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        elif self._mode == "auto":
            # Not a terminal (a log file, `ray job logs`): a plain line every tenth of the
            # work, and at least every 30 s.
            self._mode, self.every_s = "lines", 30.0
            self._next_fraction, self._last = 0.1, time.monotonic()

    def update(self, n: int = 1, **figures) -> None:
        self.n += n
        self.figures.update(figures)
        if self._bar is not None:
            self._bar.update(n)
            if figures:
                self._bar.set_postfix({k: _fmt(v) for k, v in figures.items()}, refresh=False)
        elif self._mode == "events" and time.monotonic() - self._last >= self.every_s:
            self._emit()
        elif self._mode == "lines":
            fraction = self.n / self.total if self.total else 0.0
            if fraction >= self._next_fraction or time.monotonic() - self._last >= self.every_s:
                # the next tenth, skipping one that is less than half a tenth away
                self._next_fraction = (int(fraction * 10 + 0.5) + 1) / 10
                self._last, self._printed_n = time.monotonic(), self.n
                print(self.line(), flush=True)

    def line(self) -> str:
        """`desc: n/total (pct) figures, elapsed, eta` in one line."""
        elapsed = time.monotonic() - self._started
        text = f"{self.desc}: {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")
        text += "".join(f"  {k} {_fmt(v)}" for k, v in self.figures.items())
        text += f"  {_duration(elapsed)}"
        if self.total and self.n:
            text += f", eta {_duration(elapsed * (self.total - self.n) / self.n)}"
        return text

    def _emit(self, done: bool = False) -> None:
        self._last = time.monotonic()
        event = {"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit,
                 "elapsed": round(self._last - self._started, 1), "figures": {k: _fmt(v) for k, v in self.figures.items()},
                 "done": done}
        print(EVENT + json.dumps(event), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._mode == "events":
            self._emit(done=True)
        elif self._mode == "lines" and self.n != self._printed_n:
            print(self.line(), flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _fmt(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def progress(iterable=None, desc: str = "", total: int | None = None, unit: str = "it", **_):
    """Wraps an iterable with a `Progress` (a bar on a terminal, events under `arcface run`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    bar = Progress(desc, total, unit)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def report_result(**fields) -> None:
    """A command's outcome for `arcface run`'s summary (paths, counts, figures), one line."""
    if _mode() == "events":
        print(RESULT + json.dumps(fields, default=str), flush=True)
