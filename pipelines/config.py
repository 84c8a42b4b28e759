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
    # A shared tracking server (https://...); MLFLOW_TRACKING_URI wins over it, and with
    # neither, commands use the local server of `arcface services up`.
    mlflow_tracking_uri: str = ""
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
class CleanConfig:
    """Stage 1 (Dask): thresholds and execution. Defaults argued from measurements in
    benchmarks/results/stage1_thresholds.md (demo data and real photos)."""

    # Records per Dask task; a task writes one shard. Folder formats group whole identities.
    records_per_partition: int = 2000
    workers: int = 2
    memory_limit: str = "4GiB"
    # 40 MP: a 7000x5700 photo still passes; a decompression bomb (e.g. 30000x30000) does not.
    max_pixels: int = 40_000_000
    # MTCNN's own O-Net threshold is 0.7. On the demo every detection between 0.7 and 0.9 was
    # a real face (hard pose or light), and images without a face gave no detection at all;
    # on real photos low scores are profiles and occlusions. 0.8 drops the least sure.
    min_det_score: float = 0.8
    # The template puts the eyes 35.2 px apart: below 14 px the aligned crop is upsampled
    # 2.5x and more, and holds little identity information.
    min_eye_distance_px: float = 14.0
    # Laplacian variance of the aligned central face. Demo (sharp faces vs faces blurred
    # with sigma 2.5-3.5 px; blurred median ~12-15): at 25, source landmarks (9,061 images):
    # blurred recall 0.91, precision 0.99; at 30: 0.96 but precision 0.89 (small sharp faces
    # upsampled by alignment score low). With MTCNN landmarks 25 and 30 both keep precision
    # 1.0 (recall of detected blurred faces 0.69 / 0.75). 25 keeps sharp faces safe.
    min_blur: float = 25.0
    # Hamming distance (of 256 dHash bits) under which two photos of an identity are one photo.
    # Demo: re-encoded/rescaled/shifted copies lie 9-60 bits apart; different photos of
    # the same identity (other pose, light, background) 93+ (5th percentile) around 127.
    near_duplicate_bits: int = 64
    # ... and whose 32x32 thumbnails correlate at least this much (demo: copies >= 0.87;
    # other photos that pass the hash screen <= 0.73).
    near_duplicate_correlation: float = 0.8
    # Landmarks may sit slightly outside the image (cropped chins); more is an annotation error.
    landmark_margin: float = 0.05
    detector_min_face: int = 20
    detector_device: str = "auto"
    detector_batch: int = 32
    # VGGFace2 ships landmarks; set true to re-detect anyway.
    redetect: bool = False
    jpeg_quality: int = 95
    row_group_rows: int = 1000


@dataclass
class DenoiseConfig:
    """Stage 2 (Ray): de-noise with embeddings; and the `arcface refine` loop. Angles in
    degrees. Defaults argued from measurements on the demo data (benchmarks/results/
    stage2_quality.md): they depend on the model that embeds, so check the angle histogram
    in the report (sub-centre ArcFace used 75 deg with a ResNet-100 trained on MS1M)."""

    workers: int = 2  # embedding actors
    gpu: bool = False  # one GPU per actor (checkpoints; MLflow models embed on CPU)
    batch: int = 256
    # Demo, bootstrap model (tiny IResNet, 2 epochs on stage-1 data): clean faces lie
    # within 33 deg of their identity centre (99.5th percentile), mislabelled ones beyond
    # 58 deg (1st percentile); 50 splits them with precision and recall ~0.998.
    max_angle: float = 50.0
    # Below this many faces an identity's centre is not trusted: its faces are kept unjudged.
    min_images_to_judge: int = 5
    # Identities left with fewer faces are dropped (a class needs faces to learn from).
    min_images_per_identity: int = 2
    # Use the model's class centres (dominant sub-centre) instead of the embeddings' robust
    # mean; needs a training checkpoint of a model trained on this dataset's labels.
    use_model_centres: bool = False
    # Identities whose centres are closer are one person. 0: twice the median angle of the
    # kept faces to their own centre (derived per run; see cleaning/denoise.MergeIdentities).
    # Demo: the same person filed under two ids has centres 7 deg (2-epoch bootstrap on the
    # default demo; median 17) to 30 deg apart (12 epochs on a small demo; median 21) -
    # training as two classes pushes them apart - while distinct identities are 42+ deg apart.
    merge_max_angle: float = 0.0
    # An identity is an evaluation person when at least `overlap_min_faces` evaluation
    # faces lie within `overlap_max_angle` of its centre. Demo (2-epoch bootstrap): the 3
    # overlap identities have 6, 6 and 5 of their 6 evaluation faces within 30 deg, no other
    # identity more than 1; at 40 deg a look-alike identity reaches all 6.
    overlap_max_angle: float = 30.0
    overlap_min_faces: int = 3
    # Optional file of identity ids (one per line) known to be in the evaluation sets.
    exclude_identities: str = ""
    # `arcface refine`: epochs of the bootstrap model trained on stage-1 data (the rest of
    # its recipe is [train]); then retrain on the refined data when `retrain` is set.
    bootstrap_epochs: int = 2
    retrain: bool = False


@dataclass
class TrainConfig:
    """Training (Ray Train). Defaults: the paper's recipe, sized down only where the demo
    needs it (backbone, embedding size, steps) - see configs/demo-train.toml."""

    backbone: str = "iresnet50"
    embedding_size: int = 512
    margin: str = "arcface"  # arcface | cosface | sphereface | combined
    scale: float = 64.0
    margin_m: float = 0.5  # m for arcface/cosface/sphereface
    m1: float = 1.0  # combined margin cos(m1*theta + m2) - m3
    m2: float = 0.5
    m3: float = 0.0
    straight_through: bool = False  # arcface_torch's no-grad margin (see arcface_core.margins)
    sample_rate: float = 1.0  # Partial-FC
    subcentres: int = 1
    batch_size: int = 128  # global batch, split evenly over workers
    epochs: int = 20
    max_steps: int = 0  # > 0: stop there (before the epochs end)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    poly_power: float = 2.0
    grad_clip: float = 5.0
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    sync_bn: bool = True  # normalise over the global batch (exact data parallelism)
    workers: int = 2
    gpu: bool = False
    seed: int = 0
    shuffle_rowgroups: int = 4
    decode_threads: int = 2
    storage: str = ".arcface/runs"  # absolute path or s3:// (relative paths are made absolute)
    name: str = "arcface"
    checkpoint_every: int = 100
    max_failures: int = 2
    # Comma-separated insightface .bin pair sets and *_faces.parquet identification sets;
    # default: the sets that come with the dataset (its eval/ folders, see evaluate.py).
    eval_sets: str = ""
    eval_every: int = 0  # steps; 0: at the end only
    log_every: int = 10
    mlflow_experiment: str = "arcface"
    # The MLflow registered model the trained embedder is registered under ("" = log the
    # model with the run but do not register it). Needs a tracking URI.
    registered_model: str = "arcface"
    # Testing hook: the last rank exits abruptly after this global step, once per run.
    fail_at_step: int = 0


@dataclass
class Config:
    services: ServicesConfig = field(default_factory=ServicesConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

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
