"""Which code ran: recorded with every dataset recipe, training run and registered model."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("arcface_core", "cleaning", "dataset", "infra", "pipelines")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """ARCFACE_CODE_VERSION when a submitter set it (code uploaded with a job); else the git
    commit of the checkout this code was imported from; else, for an installed wheel (a
    cluster's image has no .git), the distribution's version and a digest of its sources."""
    if os.environ.get("ARCFACE_CODE_VERSION"):
        return os.environ["ARCFACE_CODE_VERSION"]
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=5).stdout.strip()
            if commit:
                return commit
        except (OSError, subprocess.SubprocessError):
            pass
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    try:
        version = metadata.version("arcface-pipeline")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}+src.{digest.hexdigest()[:10]}"
