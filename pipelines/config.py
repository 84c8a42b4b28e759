"""One typed config for every command.

Values come from, in increasing precedence: the dataclass defaults below (the embedded
default), a TOML file (`--config FILE`), environment variables for service addresses, and
`--set section.key=value` overrides on the command line. Each command reads its section.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServicesConfig:
    # Everything local services write (pids, logs, MLflow's SQLite db and artifacts) lives here.
    state_dir: str = ".arcface"
    host: str = "127.0.0.1"
    ray_port: int = 6379
    ray_dashboard_port: int = 8265
    ray_num_cpus: int = 2
    ray_object_store_bytes: int = 1_000_000_000
    mlflow_port: int = 5000
    s3_port: int = 9000
    start_timeout_s: float = 90.0


@dataclass
class DemoConfig:
    identities: int = 300
    images_per_identity: int = 30
    seed: int = 0
    image_size: int = 250
    # Share of images filed under the wrong identity (MS-Celeb-1M has far more; 10% is enough
    # to measure whether de-noising finds it).
    label_noise: float = 0.10
    exact_duplicate: float = 0.02
    near_duplicate: float = 0.02
    undecodable: float = 0.01
    zero_byte: float = 0.005
    no_face: float = 0.01
    tiny_face: float = 0.01
    blurred: float = 0.01
    # Identities filed twice under two ids (the paper merges such identities).
    duplicate_identities: int = 2
    # Training identities that also appear in the evaluation pair set (must be removed).
    eval_overlap_identities: int = 3
    # Held-out identities used to build the evaluation pair set.
    eval_identities: int = 40
    eval_pairs: int = 600
    workers: int = 2


@dataclass
class Config:
    services: ServicesConfig = field(default_factory=ServicesConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _convert(value: str, kind: type):
    if kind is bool:
        if value.lower() in {"1", "true", "yes", "on"}:
            return True
        if value.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return kind(value)


def _apply(section_obj, key: str, value, origin: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    if key not in hints:
        known = ", ".join(sorted(hints))
        raise ValueError(f"{origin}: unknown key {key!r} in [{type(section_obj).__name__}]; known: {known}")
    kind = hints[key]
    if isinstance(value, str) and kind is not str:
        try:
            value = _convert(value, kind)
        except ValueError:
            raise ValueError(f"{origin}: {key} should be {kind.__name__}, got {value!r}") from None
    elif kind is float and isinstance(value, int):
        value = float(value)
    elif not isinstance(value, kind):
        raise ValueError(f"{origin}: {key} should be {kind.__name__}, got {value!r}")
    setattr(section_obj, key, value)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        for section, values in data.items():
            if not hasattr(cfg, section) or not isinstance(values, dict):
                raise ValueError(f"{path}: unknown config section [{section}]")
            for key, value in values.items():
                _apply(getattr(cfg, section), key, value, str(path))
    state_dir = os.environ.get("ARCFACE_STATE_DIR")
    if state_dir:
        cfg.services.state_dir = state_dir
    for item in overrides or []:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.partition(".")
        if not sep or not dot or not hasattr(cfg, section):
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        _apply(getattr(cfg, section), key, value, "--set")
    return cfg


def state_path(cfg: Config) -> Path:
    return Path(cfg.services.state_dir).resolve()
