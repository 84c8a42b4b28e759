"""The training checkpoint format: the only module that knows its file names.

A checkpoint is a folder (local, or an s3:// prefix once Ray Train has uploaded it):

    state.json                          step, world size, dataset hash, configs, MLflow run id
    backbone.pt                         backbone + its optimizer + AMP scaler (rank 0)
    centres-<start>-<end>.pt            one per rank: the centres of classes [start, end)
                                        (K rows per class with sub-centres) and their momentum

Rank r writes its own centre slice, so nothing gathers C x D on one rank. Readers take the
rows of any class range from whichever files hold them: a checkpoint written by W workers
resumes on W' (`read_centres`), and stage 2 reads all of them (`read_all_centres`).
Everything is loaded with `weights_only=True`: a checkpoint is data, never code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from dataset import bounded, storage

STATE = "state.json"
BACKBONE = "backbone.pt"
_CENTRES = re.compile(r"^centres-(\d{10})-(\d{10})\.pt$")


def centres_name(start: int, end: int) -> str:
    return f"centres-{start:010d}-{end:010d}.pt"


@dataclass
class CentreFile:
    start: int
    end: int
    uri: str


# -- writing (into a local folder that Ray Train then persists) -------------------------

def write_state(directory: str, state: dict) -> None:
    with open(os.path.join(directory, STATE), "w") as fh:
        json.dump(state, fh, indent=1)


def write_backbone(directory: str, backbone: dict, optimizer: dict, scaler: dict) -> None:
    torch.save({"backbone": backbone, "optimizer": optimizer, "scaler": scaler}, os.path.join(directory, BACKBONE))


def write_centres(directory: str, start: int, end: int, weight: torch.Tensor, optimizer_state: dict) -> None:
    """This rank's centres of classes [start, end) and their optimizer state (momentum)."""
    torch.save({"weight": weight.detach().cpu(),
                "optimizer": {k: v.cpu() if torch.is_tensor(v) else v for k, v in optimizer_state.items()}},
               os.path.join(directory, centres_name(start, end)))


def ray_storage(uri: str):
    """(path, filesystem) as Ray Train takes them: S3 goes through our configured pyarrow
    filesystem (custom endpoints included), local paths are made absolute."""
    if storage.is_s3(uri):
        return uri[len("s3://"):], storage.s3_filesystem()
    return storage.absolute(uri), None


def checkpoint_at(path: str | None):
    """A checkpoint folder (local or s3://) as a Ray Train checkpoint."""
    if not path:
        return None
    from ray.train import Checkpoint

    location, filesystem = ray_storage(path)
    return Checkpoint(location, filesystem=filesystem)


# -- reading (local or s3://) ----------------------------------------------------------------

def is_checkpoint(uri: str) -> bool:
    return storage.exists(storage.join(uri, STATE))


def is_complete(uri: str) -> bool:
    """Every file the state names is there: the backbone, and centre files covering every class."""
    if not is_checkpoint(uri) or not storage.exists(storage.join(uri, BACKBONE)):
        return False
    try:
        classes = int(read_state(uri).get("num_classes", 0))
    except (ValueError, OSError):
        return False
    covered, end = sorted((f.start, f.end) for f in centre_files(uri)), 0
    for start, stop in covered:
        if start > end:
            return False
        end = max(end, stop)
    return bool(covered) and end >= classes


def latest_checkpoint(run_folder: str) -> str:
    """The newest complete checkpoint of a run (`<train.storage>/<train.name>`), for
    `--resume latest`: by the step its state records, not by folder name or time."""
    candidates = sorted({f.rsplit("/", 1)[0] for f in storage.list_files(run_folder, suffix=STATE)})
    steps = []
    for uri in candidates:
        if storage.name(uri).startswith("checkpoint_") and is_complete(uri):
            steps.append((int(read_state(uri).get("step", 0)), uri))
    if not steps:
        raise FileNotFoundError(f"--resume latest: no complete checkpoint in {run_folder}")
    return max(steps)[1]


def read_state(uri: str) -> dict:
    if not is_checkpoint(uri):
        raise FileNotFoundError(f"{uri}: not a training checkpoint (no {STATE})")
    return json.loads(storage.read_bytes(storage.join(uri, STATE)))


def _load(uri: str, map_location="cpu") -> dict:
    # a regular file within the cap, no zip member inflating past it, tensors only
    return bounded.load_torch_file(uri, map_location, bounded.MAX_CHECKPOINT_FILE_BYTES)


def read_backbone(uri: str, map_location="cpu") -> dict:
    """{"backbone": state dict, "optimizer": ..., "scaler": ...}."""
    return _load(storage.join(uri, BACKBONE), map_location)


def centre_files(uri: str) -> list[CentreFile]:
    out = []
    for f in storage.list_files(uri, ".pt", recursive=False):
        match = _CENTRES.match(storage.name(f))
        if match:
            out.append(CentreFile(int(match.group(1)), int(match.group(2)), f))
    return sorted(out, key=lambda c: c.start)


def read_centres(uri: str, start: int, end: int, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    """The centres of classes [start, end) (K rows each) and their per-row optimizer
    buffers, cut from whichever files hold them: resuming on another worker count.
    Returns (weight, {buffer name: rows}, the optimizer's step counter or None)."""
    weights, buffers, step = [], {}, None
    for part in centre_files(uri):
        if part.end <= start or part.start >= end:
            continue
        blob = _load(part.uri)
        a, b = (max(part.start, start) - part.start) * k, (min(part.end, end) - part.start) * k
        weights.append(blob["weight"][a:b])
        for name, value in blob["optimizer"].items():
            if torch.is_tensor(value) and value.dim() == 2:
                buffers.setdefault(name, []).append(value[a:b])
            elif name == "step":
                step = value
    if not weights:
        raise FileNotFoundError(f"{uri}: no centre files cover classes [{start}, {end})")
    weight = torch.cat(weights)
    if weight.shape[0] != (end - start) * k:
        raise RuntimeError(f"{uri}: centre files cover {weight.shape[0]} rows for classes [{start}, {end}) x {k}")
    return weight, {name: torch.cat(parts) for name, parts in buffers.items()}, step


def read_all_centres(uri: str) -> np.ndarray:
    """Every class centre as (C, K, D) float32 (stage 2's model centres)."""
    state = read_state(uri)
    k = int(state["config"]["subcentres"])
    files = centre_files(uri)
    if not files:
        raise ValueError(f"{uri}: no centre files (model centres need a training checkpoint)")
    weight, _, _ = read_centres(uri, files[0].start, files[-1].end, k)
    weight = weight.float().numpy()
    return weight.reshape(-1, k, weight.shape[1])
