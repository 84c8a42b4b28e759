"""Fail closed (#31): hostile or careless inputs are refused in one line before they cost
memory, hang, train a wrong model or touch files that are not ours. Each case builds its
hostile file here (sparse files with truncate, FIFOs, struct-packed headers) and asserts the
refusal itself; the ones that used to exhaust memory or hang run in a subprocess with its
address space capped (RLIMIT_AS) and a timeout, so a regression fails instead of swapping."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cleaning import readers
from cleaning.formats.recordio import write_rec
from cleaning.readers import IR_HEADER, RecordIOError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_CAP = 2 << 30  # the bound: under 2 GB per process


def run_capped(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose address space is capped at 2 GB."""
    prelude = ("import resource\n"
               f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, timeout=timeout,
                          capture_output=True, text=True)


# -- RecordIO -------------------------------------------------------------------------------

def _rec_folder(tmp_path, order="index"):
    root = tmp_path / "rec"
    items = [(cls, bytes([cls]) * 50) for cls in range(3) for _ in range(4)]
    write_rec(str(root) + "/", items, order=order)
    return root


def _rewrite_header(root, first: float, end: float) -> None:
    """Record 0's identity range replaced in place (its frame and size stay the same)."""
    offsets = dict(line.split("\t") for line in (root / "train.idx").read_text().splitlines())
    at = int(offsets["0"]) + 8 + IR_HEADER.size  # the two float32 labels after frame and header
    with open(root / "train.rec", "r+b") as fh:
        fh.seek(at)
        fh.write(np.array([first, end], np.float32).tobytes())


PLAN_CODE = """
from cleaning import readers
try:
    readers.plan("insightface-rec", {root!r}, 4)
except readers.RecordIOError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("order", ["index", "face2rec2"])
@pytest.mark.parametrize("claim", [2.0 ** 31, 3e38, float("inf"), float("nan")])
def test_rec_header_claiming_more_identities_than_the_files_hold_is_refused(tmp_path, order, claim):
    # Before: 2^31 grew the planner past 6 GB in 77 s, 3e38 hung, inf was an OverflowError.
    root = _rec_folder(tmp_path, order)
    _rewrite_header(root, 13.0, claim)
    done = run_capped(PLAN_CODE.format(root=str(root)), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "REFUSED" in done.stdout and "record 0 (the header)" in done.stdout, done.stdout + done.stderr[-2000:]
    assert len(done.stdout.strip().splitlines()) == 1


def test_rec_header_within_the_file_sizes_is_planned(tmp_path):
    root = _rec_folder(tmp_path)
    parts = readers.plan("insightface-rec", str(root), 4)
    assert sum(1 for p in parts for s in readers.read_partition(p) if s.reject is None) == 12


def test_rec_header_range_rule_is_the_file_sizes(tmp_path):
    root = _rec_folder(tmp_path)  # 12 images + 3 identities + header: 16 records
    idx, rec = str(root / "train.idx"), str(root / "train.rec")
    fit = min(os.path.getsize(idx) // 4, os.path.getsize(rec) // 32)
    assert readers.check_header_range(np.array([13, fit], np.float32), idx, rec) == (13, fit)
    with pytest.raises(RecordIOError, match="more than train.idx and train.rec can hold"):
        readers.check_header_range(np.array([13, fit + 1], np.float32), idx, rec)
    with pytest.raises(RecordIOError, match="1 <= first <= end"):
        readers.check_header_range(np.array([13, 5], np.float32), idx, rec)
    with pytest.raises(RecordIOError, match="whole numbers"):
        readers.check_header_range(np.array([13.5, 15], np.float32), idx, rec)


def _replace_idx(root, make) -> None:
    (root / "train.idx").unlink()
    make(str(root / "train.idx"))


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "sparse_no_newline"])
def test_rec_index_that_is_not_a_bounded_regular_file_is_refused(tmp_path, kind):
    # Before: /dev/zero or a 50 GB sparse index with no newline took 6-10 GB in seconds; a FIFO hung.
    root = _rec_folder(tmp_path)
    if kind == "dev_zero":
        _replace_idx(root, lambda p: os.symlink("/dev/zero", p))
    elif kind == "fifo":
        _replace_idx(root, os.mkfifo)
    else:
        _replace_idx(root, lambda p: os.truncate(open(p, "wb").name, 50 << 30))
    done = run_capped(PLAN_CODE.format(root=str(root)), timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    rule = "not a regular file" if kind != "sparse_no_newline" else "a line of over 1024 bytes"
    assert "REFUSED" in done.stdout and "train.idx" in done.stdout and rule in done.stdout, done.stdout
    if kind == "sparse_no_newline":
        assert "train.idx:1:" in done.stdout  # the line is named


def test_rec_data_file_that_is_a_fifo_is_refused(tmp_path):
    root = _rec_folder(tmp_path)
    (root / "train.rec").unlink()
    os.mkfifo(root / "train.rec")
    done = run_capped(PLAN_CODE.format(root=str(root)), timeout=30)
    assert "REFUSED" in done.stdout and "train.rec: not a regular file" in done.stdout, done.stdout + done.stderr
