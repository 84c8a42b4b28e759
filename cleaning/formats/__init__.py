"""Raw dataset formats: one registry entry per raw layout stage 1 reads, and the files insightface ships.

An entry (`RawFormat`) is a format's single home: its name, a one-line help, and where its
code lives: the planner and record reader (cleaning/readers.py), the files and folders a
partition reads (digested into the input stamp that tells a finished partition from a stale
one), and the demo generator's writer (cleaning/synthetic/demo.py). Everything else derives
from `REGISTRY`: RAW_FORMATS (the CLI's choices), `readers.plan`, `readers.read_partition`,
`readers.input_stamp`, the demo generator's format list and dispatch, and the tests run over
every format.

Code is named as "module:attribute" and imported on first use (`load`), so listing the
formats (`arcface --help`) imports no OpenCV, Dask or pyarrow.

To add a format: write its planner, reader and inputs (cleaning/readers.py or a module of
its own), its demo layout (cleaning/synthetic/demo.py), and add its entry below.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

# How an insightface RecordIO file lists its records (cleaning/formats/recordio.py): index =
# header, images, identity records; face2rec2 = images, then header and identity records, as
# insightface's face2rec2.py writes. Here, not in recordio.py, so the config can name the
# choices without importing numpy.
RECORD_ORDERS = ("index", "face2rec2")


@dataclass(frozen=True)
class RawFormat:
    name: str
    help: str  # one line, for --help
    # "module:attribute" of:
    planner: str  # (root, records_per_partition) -> list[Partition], never splitting an identity
    reader: str  # (Partition) -> Iterator[RawSample], one per record, bad records as rejects
    inputs: str  # (Partition) -> [("file" | "listing", uri)]: what the partition reads, for its input stamp
    demo: str  # a cleaning.synthetic.demo.DemoLayout: how the demo writes this format


REGISTRY: dict[str, RawFormat] = {f.name: f for f in (
    RawFormat("vggface2", "VGGFace2: train/<identity>/*.jpg, boxes and landmarks in bb_landmark/*.csv",
              planner="cleaning.readers:plan_vggface2", reader="cleaning.readers:read_vggface2",
              inputs="cleaning.readers:vggface2_inputs", demo="cleaning.synthetic.demo:VGGFACE2_LAYOUT"),
    RawFormat("msceleb-tsv", "MS-Celeb-1M: one .tsv (or a folder holding one), a row per face, base64 image",
              planner="cleaning.readers:plan_msceleb", reader="cleaning.readers:read_msceleb",
              inputs="cleaning.readers:msceleb_inputs", demo="cleaning.synthetic.demo:MSCELEB_LAYOUT"),
    RawFormat("image-folder", "a folder per identity holding its image files",
              planner="cleaning.readers:plan_image_folder", reader="cleaning.readers:read_image_folder",
              inputs="cleaning.readers:image_folder_inputs", demo="cleaning.synthetic.demo:IMAGE_FOLDER_LAYOUT"),
    RawFormat("insightface-rec", "insightface's train.rec/train.idx (MS1MV2, MS1MV3): aligned 112x112 faces",
              planner="cleaning.readers:plan_insightface_rec", reader="cleaning.readers:read_insightface_rec",
              inputs="cleaning.readers:insightface_rec_inputs", demo="cleaning.synthetic.demo:INSIGHTFACE_REC_LAYOUT"),
)}

RAW_FORMATS = tuple(REGISTRY)


def get_format(name: str) -> RawFormat:
    """The entry of format `name`; ValueError naming the formats there are otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; choose from {', '.join(RAW_FORMATS)}") from None


def format_help() -> dict[str, str]:
    """Each format's one-line help, by name, in the order of RAW_FORMATS."""
    return {name: f.help for name, f in REGISTRY.items()}


@functools.cache
def load(ref: str):
    """The object a "module:attribute" reference names (its module imported on first use)."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)
