"""The project's one logging setup. Every entry point calls `setup_logging` once."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


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
        for name in ("urllib3", "botocore", "boto3", "s3transfer", "matplotlib", "PIL", "distributed", "dask"):
            logging.getLogger(name).setLevel(logging.WARNING)
    root._arcface_configured = True  # type: ignore[attr-defined]


def progress(iterable=None, **kwargs):
    """Progress bar for long work; silent when stderr is not a terminal unless forced."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", None if os.environ.get("ARCFACE_PROGRESS", "auto") == "auto" else
                      os.environ.get("ARCFACE_PROGRESS") == "0")
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
