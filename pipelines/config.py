"""One typed config for every command, assembled from the sections that live with the code
that reads them:

    [services]   infra/local_services.py            ServicesConfig
    [demo]       cleaning/synthetic/demo_config.py  DemoConfig
    [clean]      cleaning/config.py                 CleanConfig  (stage 1)
    [denoise]    pipelines/denoise_config.py        DenoiseConfig (stage 2, `arcface clean-data`)
    [train]      pipelines/training/config.py       TrainConfig
    [margin]     pipelines/training/config.py       MarginConfig (+ [margin.arcface] ... per margin)
    [reference]  free-form, informational: the published figures a recipe (configs/*.toml)
                 should reach and their source; printed by `config show`, read by no job

Each section's module imports nothing heavy (no torch, Dask, Ray or OpenCV), so loading the
config, and `arcface --help`, stays fast. Each setting declares its range (or choices) and
its meaning beside its field (arcface_core.settings.setting); `validate` checks them all,
with the rules between settings that each section keeps in its `validate`, once per command.

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

import copy
import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field

from arcface_core.settings import problem
from cleaning.synthetic.demo_config import DemoConfig
from infra.local_services import ServicesConfig
from cleaning.config import CleanConfig
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
    reference: dict = field(default_factory=dict, metadata={"doc": (
        "free-form: the published figures a recipe should reach and their source (read by no job)")})
    # Where each value came from, by dotted name: "file ...", "environment ...", "--set" or
    # "derived from ..." (absent: the default). Bookkeeping of load_config, not a setting:
    # no file sets it and to_dict / to_toml leave it out.
    origins: dict[str, str] = field(default_factory=dict, compare=False, repr=False, metadata={"setting": False})

    def to_dict(self) -> dict:
        """The settings, section by section."""
        return {name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
                for name, value in ((f.name, getattr(self, f.name)) for f in _section_fields())}


def _section_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.metadata.get("setting", True)]


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


def declared_settings(cfg: Config) -> dict[str, tuple[object, typing.Mapping]]:
    """Every setting by its dotted name ("train.lr", "margin.arcface.m"): its value and what
    its field declares beside itself (metadata "doc", and "range" or "choices")."""
    out: dict[str, tuple[object, typing.Mapping]] = {}

    def walk(section, fields, prefix: str) -> None:
        for f in fields:
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, dataclasses.fields(value), f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value, f.metadata

    walk(cfg, _section_fields(), "")
    return out


def numeric_settings(cfg: Config) -> dict[str, float]:
    """Every numeric setting by its dotted name."""
    return {name: value for name, (value, _) in declared_settings(cfg).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def validate(cfg: Config) -> None:
    """Each setting against the range or choices its field declares (a value outside would
    hang, silently disable a check or fail deep inside a job), then the rules between
    settings, which each section keeps in its own `validate`."""
    for name, (value, declared) in declared_settings(cfg).items():
        wrong = problem(name, value, declared)
        if wrong:
            raise ConfigError(wrong)
    try:
        cfg.train.validate()
        cfg.train.check_compile_backend(on_cpu=not cfg.train.gpu)
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
                              f"{', '.join(f.name for f in _section_fields())})")
        _set(cfg, [section], values, str(path), "", origins)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                environ: typing.Mapping[str, str] | None = None) -> Config:
    cfg = Config()
    origins = cfg.origins
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
        if not sep or len(parts) < 2 or parts[0] not in {f.name for f in _section_fields()}:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        _set(getattr(cfg, parts[0]), parts[1:], value, "--set", parts[0], origins)
    if not cfg.train.storage:  # checkpoints live with the rest of the local state by default
        cfg.train.storage = os.path.join(cfg.services.state_dir, "runs")
        origins["train.storage"] = "derived from services.state_dir"
    validate(cfg)
    return cfg


def to_toml(cfg: Config, origins: bool = False) -> str:
    """The effective config as TOML that `--config` reads back; with `origins`, each value
    carries a comment saying where it came from (default, file, environment, --set)."""
    where = cfg.origins

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines: list[str] = []
    declared = {name: meaning for name, (_, meaning) in declared_settings(cfg).items()}

    def describe(name: str) -> None:
        """What a setting means, and the values it takes, as its field declares them."""
        meaning = declared.get(name, {})
        if "doc" in meaning:
            allowed = (f"; in {meaning['range']}" if "range" in meaning else
                       f"; one of {', '.join(meaning['choices'])}" if "choices" in meaning else "")
            lines.append(f"# {meaning['doc']}{allowed}")

    def section(name: str, values: dict) -> None:
        lines.append(f"[{name}]")
        describe(name)  # a free-form table ([reference]) is one setting
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for k, v in values.items():
            if not isinstance(v, dict):
                describe(f"{name}.{k}")
                # [reference] is one free-form value: its keys carry the table's origin
                note = f"  # {where.get(f'{name}.{k}') or where.get(name.split('.')[0], 'default')}" if origins else ""
                lines.append(f"{k} = {value(v)}{note}")
        lines.append("")
        for k, v in nested.items():
            section(f"{name}.{k}", v)

    for name, values in cfg.to_dict().items():
        section(name, values)
    return "\n".join(lines)
