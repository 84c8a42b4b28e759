"""Every registered raw format, through the registry alone: its entry resolves, listing the
formats stays light, the demo writes the format and plan -> read gives back every record it
wrote, and the input stamp follows the partition's input files. (Format-specific edge cases:
tests/test_readers.py; the demo files parsed by independent code: tests/test_demo_data.py;
the same layouts through all of stage 1: tests/test_stage1.py.)"""

import json
import os
import pickle
import posixpath
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from cleaning.formats import RAW_FORMATS, REGISTRY, format_help, get_format, load
from cleaning.readers import input_stamp, plan, read_partition
from cleaning.synthetic.demo import DemoConfig, DemoLayout, generate, input_root

# Defects the demo injects into a record's row or annotation: a reader rejects those records itself.
ROW_DEFECTS = {"malformed_row", "bad_annotation"}


@pytest.mark.parametrize("fmt", RAW_FORMATS)
def test_entry_names_its_code(fmt):
    entry = get_format(fmt)
    assert entry.name == fmt and entry.help.strip() and "\n" not in entry.help
    assert format_help()[fmt] == entry.help
    for ref in (entry.planner, entry.reader, entry.inputs):
        assert callable(load(ref)), ref
    assert isinstance(load(entry.demo), DemoLayout)


def test_raw_formats_are_the_registry_and_unknown_names_are_refused(tmp_path):
    assert RAW_FORMATS == tuple(REGISTRY) == tuple(format_help())
    with pytest.raises(ValueError, match="unknown format 'lmdb'; choose from vggface2, msceleb-tsv"):
        plan("lmdb", str(tmp_path), 10)
    with pytest.raises(ValueError, match="unknown format 'lmdb'"):
        generate(tmp_path / "demo", DemoConfig(identities=2, images_per_identity=2), ["lmdb"])
    assert not (tmp_path / "demo").exists(), "refused before anything is written"


def test_listing_the_formats_imports_no_reader():
    """`arcface --help` lists the formats and their help: that must not import the readers,
    OpenCV, Dask, pyarrow or numpy."""
    heavy = ("cleaning.readers", "cleaning.synthetic.demo", "cv2", "dask", "pyarrow", "numpy")
    code = ("import sys; import cleaning.formats as f; f.format_help(); f.get_format('vggface2'); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _record_key(key: str) -> str:
    """A reader's key as the demo's ground truth names it (folder formats keep the file suffix)."""
    stem, suffix = posixpath.splitext(key)
    return stem if suffix.lower() in (".jpg", ".jpeg", ".png") else key


@pytest.mark.parametrize("fmt", RAW_FORMATS)
def test_plan_and_read_give_back_every_record_the_demo_wrote(demo_raw, fmt):
    truth = json.loads((demo_raw / fmt / "ground_truth.json").read_text())
    parts = plan(fmt, str(input_root(demo_raw / fmt, fmt)), 40)
    assert len(parts) > 1
    read = {}
    for part in parts:
        # What goes to a worker: pickled, and described in JSON for its fingerprint.
        assert pickle.loads(pickle.dumps(part)) == part and json.dumps(part.detail, default=str)
        for sample in read_partition(part):
            key = _record_key(sample.key)
            assert key not in read, f"{key} read twice"
            read[key] = sample
    for rec in truth["images"]:
        sample = read.pop(rec["key"])  # every record the demo wrote is read, once
        if sample.reject:
            assert set(rec["defects"]) & ROW_DEFECTS, (rec, sample.reject)
            continue
        assert "malformed_row" not in rec["defects"], rec
        assert sample.identity == rec["filed_identity"]
        if not rec["defects"]:  # a clean record's bytes are the image the demo drew
            image = cv2.imdecode(np.frombuffer(sample.data, np.uint8), cv2.IMREAD_COLOR)
            assert image is not None and (not sample.aligned or image.shape == (112, 112, 3))
            if sample.landmarks is not None:
                assert np.allclose(sample.landmarks, rec["landmarks"], atol=0.01)
    # Anything else read is a row naming no image the demo wrote, rejected as such.
    ghosts = {m["key"] for m in truth["malformed_rows"] if m["kind"] == "missing_image"}
    assert {k.split(":", 1)[-1] for k in read} == ghosts and all(s.reject for s in read.values())


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_demo")
    generate(out, DemoConfig(identities=4, images_per_identity=6, seed=3, eval_identities=2, eval_pairs=8,
                             ijb_subjects=0, workers=1), list(RAW_FORMATS))
    return out


@pytest.mark.parametrize("fmt", RAW_FORMATS)
def test_input_stamp_follows_the_partitions_input_files(tiny_demo, tmp_path, fmt):
    layout = tmp_path / fmt
    shutil.copytree(tiny_demo / fmt, layout)
    parts = plan(fmt, str(input_root(layout, fmt)), 1)
    assert len(parts) > 1
    stamps = [input_stamp(p) for p in parts]
    assert stamps == [input_stamp(p) for p in parts]
    later = os.stat(layout / "ground_truth.json").st_mtime_ns + 10**9
    os.utime(layout / "ground_truth.json", ns=(later, later))  # beside the input, not read
    assert [input_stamp(p) for p in parts] == stamps
    for path in layout.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(later, later))
    assert all(a != b for a, b in zip(stamps, (input_stamp(p) for p in parts)))
