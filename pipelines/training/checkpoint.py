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

import io
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from dataset import storage

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


# -- reading (local or s3://) ----------------------------------------------------------------

def is_checkpoint(uri: str) -> bool:
    return storage.exists(storage.join(uri, STATE))


def read_state(uri: str) -> dict:
    if not is_checkpoint(uri):
        raise FileNotFoundError(f"{uri}: not a training checkpoint (no {STATE})")
    return json.loads(storage.read_bytes(storage.join(uri, STATE)))


def _load(uri: str, map_location="cpu") -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location=map_location, weights_only=True)


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
