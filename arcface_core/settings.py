"""A config setting declared once, beside its dataclass field: its default, the values it
may take (a range, or a list of choices) and what it means.

    workers: int = setting(2, range=WORKERS, doc="Dask worker processes")
    amp: str = setting("auto", choices=("auto", "bf16", "fp16", "off"), doc="mixed precision")

pipelines/config.py checks every declared setting with `problem` (once per command) and
`arcface config show` prints each doc. Config sections live with the code that reads them,
in every layer (the demo data in cleaning/, the services in infra/, the jobs in pipelines/),
so this module sits in the package all of them may import, and imports only the standard
library: loading the config stays fast.
"""

from __future__ import annotations

import dataclasses
import math

# Worker processes (or Ray workers) per job. No real run needs more; a typo beyond it would
# exhaust the machine rather than run (#31). Every section's `workers` shares this bound.
MAX_WORKERS = 1024
WORKERS = f"[1, {MAX_WORKERS}]"


def setting(default, *, doc: str, range: str | None = None, choices: tuple | None = None):
    """A dataclass field that declares its meaning (`doc`, one line) and, for a number, its
    `range`: an interval where "[" / "]" include the bound and "(" / ")" do not, bounds being
    numbers, "inf" or "pi" (e.g. "[1, inf)", "(0, 1]", "[0, pi)"); for a value from a fixed
    set, its `choices`."""
    metadata: dict = {"doc": doc}
    if range is not None:
        _bounds(range)  # a malformed interval fails where it is declared, at import
        metadata["range"] = range
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


def _bounds(interval: str) -> tuple[float, float]:
    if interval[0] not in "[(" or interval[-1] not in ")]" or interval.count(",") != 1:
        raise ValueError(f"not an interval: {interval!r} (e.g. \"[1, inf)\")")
    return tuple(math.pi if text.strip() == "pi" else float(text) for text in interval[1:-1].split(","))


def in_range(value: float, interval: str) -> bool:
    lo, hi = _bounds(interval)
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


def problem(name: str, value, metadata) -> str | None:
    """What is wrong with `value` for the setting `name` declared with `metadata`, in one
    line naming the range or the choices; None when nothing is."""
    interval = metadata.get("range")
    if interval is not None and not in_range(value, interval):
        return f"{name} must be in {interval}, got {value!r}"
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        return f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}"
    return None
