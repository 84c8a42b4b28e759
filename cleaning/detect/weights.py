"""MTCNN weights: fetched once from the facenet-pytorch 2.6.0 wheel on PyPI, then cached.

Only the three state dicts are taken from the wheel (installing facenet-pytorch would pull
torchvision and another torch). Files are checked against pinned SHA-256 digests and loaded
with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

WHEEL = "facenet-pytorch==2.6.0"
SHA256 = {
    "pnet": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}


def cache_dir() -> Path:
    root = os.environ.get("ARCFACE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "arcface")
    return Path(root) / "mtcnn"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def have_weights() -> bool:
    d = cache_dir()
    return all((d / f"{n}.pt").exists() and _sha256(d / f"{n}.pt") == h for n, h in SHA256.items())


def fetch_mtcnn_weights() -> Path:
    """Download the wheel with pip (no dependencies), extract and verify the weights."""
    target = cache_dir()
    if have_weights():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("fetching MTCNN weights from the %s wheel", WHEEL)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("facenet_pytorch-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name, digest in SHA256.items():
                out = Path(tmp) / f"{name}.pt"
                with zf.open(f"facenet_pytorch/data/{name}.pt") as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if _sha256(out) != digest:
                    raise RuntimeError(f"{name}.pt from {WHEEL} does not match its pinned SHA-256")
                os.replace(out, target / f"{name}.pt")
    return target


def load_mtcnn_weights() -> dict[str, dict]:
    if not have_weights():
        raise FileNotFoundError(f"MTCNN weights are not in {cache_dir()}; run `make setup` or `arcface fetch-weights`")
    d = cache_dir()
    return {n: torch.load(d / f"{n}.pt", map_location="cpu", weights_only=True) for n in SHA256}
