"""One typed config for every command, assembled from the sections that live with the code
that reads them:

    [services]   infra/local_services.py            ServicesConfig
    [demo]       cleaning/synthetic/demo_config.py  DemoConfig
    [clean]      pipelines/clean_config.py          CleanConfig  (stage 1)
    [denoise]    pipelines/denoise_config.py        DenoiseConfig (stage 2, `arcface refine`)

Each section's module imports nothing heavy (no torch, Dask, Ray or OpenCV), so loading the
config, and `arcface --help`, stays fast.
    [train]      pipelines/training/config.py TrainConfig
    [margin]     pipelines/training/config.py MarginConfig (+ [margin.arcface] ... per margin)
    [reference]  free-form, informational: the published figures a recipe (configs/*.toml)
                 should reach and their source; printed by `config show`, read by no job

Values come from, in increasing precedence: the dataclass defaults (the embedded default),
a TOML file (`--config FILE`), the environment, and `--set section.key=value` (nested:
`--set margin.cosface.m=0.4`). The environment is read here and nowhere else:

    MLFLOW_TRACKING_URI -> services.mlflow_tracking_uri     RAY_ADDRESS -> services.ray_address
    ARCFACE_STATE_DIR   -> services.state_dir
    ARCFACE_CONFIG      -> a base config file (site settings: ports, servers), read before --config
    ARCFACE_CONFIG_TOML -> a config's content, read after ARCFACE_CONFIG: what `arcface submit`
                           sends with a job (the submitter's effective config, as TOML)
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field

from cleaning.synthetic.demo_config import DemoConfig
from infra.local_services import ServicesConfig
from pipelines.clean_config import CleanConfig
from pipelines.denoise_config import DenoiseConfig
from pipelines.training.config import MarginConfig, TrainConfig

ENVIRONMENT = {
    "MLFLOW_TRACKING_URI": ("services", "mlflow_tracking_uri"),
    "RAY_ADDRESS": ("services", "ray_address"),
    "ARCFACE_STATE_DIR": ("services", "state_dir"),
}


@dataclass
class Config:
    services: ServicesConfig = field(default_factory=ServicesConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    margin: MarginConfig = field(default_factory=MarginConfig)
    reference: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _convert(value: str, kind: type, where: str):
    if kind is bool:
        if value.lower() in {"1", "true", "yes", "on"}:
            return True
        if value.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{where}: should be true or false, got {value!r}")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{where}: should be {kind.__name__}, got {value!r}") from None


def _set(section, path: list[str], value, origin: str, where: str, origins: dict | None = None) -> None:
    """Set `path` (keys below `section`) to `value`, checking its type; note where it came from."""
    hints = typing.get_type_hints(type(section))
    key = path[0]
    here = f"{where}.{key}" if where else key
    if key not in hints:
        known = ", ".join(sorted(hints))
        skew = (" - the submitting arcface is newer than the cluster's: install the same version on both"
                if origin == "ARCFACE_CONFIG_TOML" else "")
        raise ConfigError(f"{origin}: unknown key {here!r} (known in [{where}]: {known}){skew}")
    kind = hints[key]
    if dataclasses.is_dataclass(kind):
        child = getattr(section, key)
        if len(path) > 1:
            return _set(child, path[1:], value, origin, here, origins)
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: [{here}] is a section, got {value!r}")
        for k, v in value.items():
            _set(child, [k], v, origin, here, origins)
        return
    if len(path) > 1:
        raise ConfigError(f"{origin}: {here} is a value, not a section")
    if isinstance(value, str) and kind is not str:
        value = _convert(value, kind, f"{origin}: {here}")
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif type(value) is not kind:  # a TOML `true` is no int, a number is no string
        raise ConfigError(f"{origin}: {here} should be {kind.__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{origin}: {here} must be a finite number, got {value!r}")
    setattr(section, key, value)
    if origins is not None:
        origins[here] = origin if origin == "--set" else f"file {origin}"


INF = math.inf
# The range of every numeric setting, as an interval: "[" / "]" include the bound, "(" / ")"
# do not. A value outside would hang (0 workers), silently disable a check (a NaN or
# negative threshold) or fail deep inside a job; tests/test_config.py checks that every
# numeric field of the config has its entry here. Upper bounds are what no real run needs
# and what would exhaust the machine or train nothing (#31): MAX_WORKERS processes (or Ray
# workers) per job, lr above 10, a logit scale above 1024 (exp(s) overflows float32 at ~88,
# fp64 at ~709: the loss goes NaN). A stall below 5 s would restart healthy partitions.
MAX_WORKERS = 1024
_WORKERS = f"[1, {MAX_WORKERS}]"
RANGES = {
    **{f"services.{k}": "[1, 65535]" for k in ("ray_port", "ray_dashboard_port", "mlflow_port", "s3_port")},
    "services.ray_num_cpus": "[1, inf)", "services.ray_object_store_bytes": "[78643200, inf)",
    "services.start_timeout_s": "(0, inf)",
    "demo.identities": "[1, inf)", "demo.images_per_identity": "[1, inf)", "demo.seed": "[0, inf)",
    "demo.image_size": "[64, 4096]",
    **{f"demo.{k}": "[0, 1]" for k in ("label_noise", "exact_duplicate", "near_duplicate", "undecodable",
                                       "zero_byte", "no_face", "tiny_face", "blurred")},
    "demo.duplicate_identities": "[0, inf)", "demo.eval_overlap_identities": "[0, inf)",
    "demo.eval_identities": "[0, inf)", "demo.eval_pairs": "[0, inf)", "demo.ijb_subjects": "[0, inf)",
    "demo.workers": _WORKERS, "demo.noise_sources": "[0, inf)", "demo.images_per_identity_min": "[0, inf)",
    "clean.records_per_partition": "[1, inf)", "clean.workers": _WORKERS, "clean.max_pixels": "[1, inf)",
    "clean.stall_seconds": "[5, inf)", "clean.max_internal_error_share": "[0, 1]",
    "clean.min_det_score": "[0, 1]", "clean.min_eye_distance_px": "[0, inf)", "clean.min_blur": "[0, inf)",
    "clean.near_duplicate_bits": "[0, 256]", "clean.near_duplicate_correlation": "[-1, 1]",
    "clean.near_duplicate_aligned_bits": "[0, 256]", "clean.near_duplicate_aligned_correlation": "[-1, 1]",
    "clean.landmark_margin": "[0, 1]", "clean.detector_min_face": "[12, inf)", "clean.detector_batch": "[1, inf)",
    "clean.detect_max_side": "[112, inf)", "clean.decoded_pixels_per_chunk": "[1, inf)",
    "clean.jpeg_quality": "[1, 100]", "clean.row_group_rows": "[1, inf)",
    "denoise.workers": _WORKERS, "denoise.pass_tasks": "[0, inf)", "denoise.batch": "[1, inf)", "denoise.max_angle": "[0, 180]",
    "denoise.min_images_to_judge": "[1, inf)", "denoise.min_images_per_identity": "[1, inf)",
    "denoise.merge_max_angle": "[0, 180]", "denoise.merge_same_person_angle": "[0, 180]",
    "denoise.overlap_max_angle": "[0, 180]",
    "denoise.overlap_min_faces": "[1, inf)", "denoise.bootstrap_epochs": "[1, inf)", "denoise.bootstrap_subcentres": "[1, inf)", "denoise.rounds": "[1, inf)", "denoise.another_round_above": "[0, 1]",
    "train.embedding_size": "[1, 65536]", "train.freeze_stages": "[0, 4]", "train.sample_rate": "(0, 1]",
    "train.subcentres": "[1, inf)", "train.batch_size": "[1, inf)", "train.epochs": "[0, inf)",
    "train.max_steps": "[0, inf)", "train.lr": "(0, 10]", "train.momentum": "[0, 1)",
    "train.weight_decay": "[0, 1]", "train.warmup_steps": "[0, inf)", "train.poly_power": "[0, inf)",
    "train.grad_clip": "[0, inf)", "train.workers": _WORKERS, "train.seed": "[0, inf)",
    "train.shuffle_rowgroups": "[1, inf)", "train.decode_threads": "[1, 256]", "train.checkpoint_every": "[1, inf)",
    "train.max_failures": "[0, 100]", "train.eval_every": "[0, inf)", "train.log_every": "[1, inf)",
    "margin.scale": "(0, 1024]", "margin.arcface.m": "[0, 3.14159)", "margin.cosface.m": "[0, 2)",
    "margin.sphereface.m": "[1, 10]", "margin.sphereface.lambda_base": "[0, inf)",
    "margin.sphereface.lambda_min": "[0, inf)", "margin.sphereface.gamma": "[0, inf)",
    "margin.sphereface.power": "[0, inf)", "margin.combined.m1": "[1, 10]", "margin.combined.m2": "[0, 3.14159)",
    "margin.combined.m3": "[0, 2)",
}


def _field_metadata(section, key: str, prefix: str = "") -> dict[str, str]:
    """Dotted name -> what a field declares beside itself under `key` (metadata "range" or "doc")."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_field_metadata(value, key, f"{prefix}{f.name}."))
        elif key in f.metadata:
            out[f"{prefix}{f.name}"] = f.metadata[key]
    return out


RANGES.update(_field_metadata(Config(), "range"))


def _in_range(value: float, interval: str) -> bool:
    lo_text, hi_text = interval[1:-1].split(",")
    lo, hi = float(lo_text), float(hi_text)
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


def numeric_settings(cfg: Config) -> dict[str, float]:
    """Every numeric setting by its dotted name."""
    out: dict[str, float] = {}

    def walk(section, prefix: str) -> None:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}{f.name}"] = value

    walk(cfg, "")
    return out


def validate(cfg: Config) -> None:
    """Ranges that would otherwise hang or silently disable something."""
    for name, value in numeric_settings(cfg).items():
        interval = RANGES.get(name)
        if interval and not _in_range(value, interval):
            raise ConfigError(f"{name} must be in {interval}, got {value!r}")
    checks = [
        (cfg.clean.workers >= 1, "clean.workers must be >= 1"),
        (cfg.clean.records_per_partition >= 1, "clean.records_per_partition must be >= 1"),
        (cfg.clean.max_pixels > 0, "clean.max_pixels must be > 0"),
        (cfg.clean.min_blur >= 0, "clean.min_blur must be >= 0"),
        (0 <= cfg.clean.min_det_score <= 1, "clean.min_det_score must be in [0, 1]"),
        (cfg.train.workers >= 1, "train.workers must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.epochs >= 1 or cfg.train.max_steps > 0, "train.epochs must be >= 1 (or set train.max_steps)"),
        (0 < cfg.train.sample_rate <= 1, "train.sample_rate must be in (0, 1]"),
        (cfg.train.subcentres >= 1, "train.subcentres must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.amp in ("auto", "bf16", "fp16", "off"), "train.amp must be auto, bf16, fp16 or off"),
        (cfg.train.channels_last in ("auto", "on", "off"), "train.channels_last must be auto, on or off"),
        (not (cfg.train.compile and not cfg.train.gpu and cfg.train.compile_backend == "inductor"),
         "train.compile with the inductor backend crashed on CPU builds of torch 2.13 (double free): "
         "on CPU set train.compile_backend = \"aot_eager\", or train on GPUs"),
        (cfg.margin.scale > 0, "margin.scale must be > 0"),
        (cfg.denoise.workers >= 1, "denoise.workers must be >= 1"),
        (0 <= cfg.denoise.max_angle <= 180, "denoise.max_angle must be in [0, 180] (0: derived per run)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        cfg.train.validate()
        cfg.margin.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _apply_file(cfg: Config, path, origins: dict, text: str | None = None) -> None:
    """Apply a TOML file (or, with `text`, TOML content named `path` in messages)."""
    try:
        if text is not None:
            data = tomllib.loads(text)
        else:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for section, values in data.items():
        if section not in cfg.to_dict() or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown config section [{section}] (known: "
                              f"{', '.join(f.name for f in dataclasses.fields(Config))})")
        _set(cfg, [section], values, str(path), "", origins)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                environ: typing.Mapping[str, str] | None = None) -> Config:
    cfg = Config()
    origins: dict[str, str] = {}  # dotted key -> where its value came from (absent: the default)
    env = os.environ if environ is None else environ
    if env.get("ARCFACE_CONFIG"):
        _apply_file(cfg, env["ARCFACE_CONFIG"], origins)
    if env.get("ARCFACE_CONFIG_TOML"):  # a submitted job's config, sent by content
        _apply_file(cfg, "ARCFACE_CONFIG_TOML", origins, text=env["ARCFACE_CONFIG_TOML"])
    if path:
        _apply_file(cfg, path, origins)
    for variable, (section, key) in ENVIRONMENT.items():
        if env.get(variable):
            setattr(getattr(cfg, section), key, env[variable])
            origins[f"{section}.{key}"] = f"environment {variable}"
    for item in overrides or []:
        dotted, sep, value = item.partition("=")
        parts = dotted.split(".")
        if not sep or len(parts) < 2 or not hasattr(cfg, parts[0]):
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        _set(getattr(cfg, parts[0]), parts[1:], value, "--set", parts[0], origins)
    if not cfg.train.storage:  # checkpoints live with the rest of the local state by default
        cfg.train.storage = os.path.join(cfg.services.state_dir, "runs")
        origins["train.storage"] = "derived from services.state_dir"
    validate(cfg)
    cfg.origins = origins
    return cfg


def to_toml(cfg: Config, origins: bool = False) -> str:
    """The effective config as TOML that `--config` reads back; with `origins`, each value
    carries a comment saying where it came from (default, file, environment, --set)."""
    where = getattr(cfg, "origins", {})
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines: list[str] = []
    docs = _field_metadata(cfg, "doc")

    def section(name: str, values: dict) -> None:
        lines.append(f"[{name}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for k, v in values.items():
            if not isinstance(v, dict):
                if f"{name}.{k}" in docs:  # what a value means, where the field declares it
                    lines.append(f"# {docs[f'{name}.{k}']}")
                # [reference] is one free-form value: its keys carry the table's origin
                note = f"  # {where.get(f'{name}.{k}') or where.get(name.split('.')[0], 'default')}" if origins else ""
                lines.append(f"{k} = {value(v)}{note}")
        lines.append("")
        for k, v in nested.items():
            section(f"{name}.{k}", v)

    for name, values in cfg.to_dict().items():
        section(name, values)
    return "\n".join(lines)
