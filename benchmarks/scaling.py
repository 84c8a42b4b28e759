"""What the scale benchmarks share: each size is measured in a fresh process, which prints
one `RESULT {json}` line; growth is reported as the exponent k of quantity ~ size^k between
the smallest and the largest size measured. A process's peak memory is its VmHWM
(cleaning.stage1.peak_rss_mib): getrusage's ru_maxrss survives exec, so a fresh process
started after the benchmark wrote a large input would report the benchmark's own size."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np


def measure_in_process(args: list[str]) -> dict:
    """Run `python <args>`; the dict its RESULT line holds, or {"failed": why}."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"failed": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(line[len("RESULT "):])


def report(result: dict) -> None:
    """The child's side of measure_in_process."""
    print("RESULT " + json.dumps(result))


def growth_exponents(rows: list[dict], size: str, keys: list[str]) -> dict:
    """{key: k} from the first to the last row, or {} with fewer than two rows."""
    if len(rows) < 2:
        return {}
    a, b = rows[0], rows[-1]
    span = np.log(b[size] / a[size])
    return {"from": a[size], "to": b[size], **{key: float(np.log(b[key] / a[key]) / span) for key in keys}}
