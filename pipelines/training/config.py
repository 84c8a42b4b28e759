"""The training sections of the config: `[train]` (the recipe and its execution) and
`[margin]` (which margin, with each margin's own parameters and paper defaults).

    [margin]
    type = "cosface"        # arcface | cosface | sphereface | combined
    scale = 64.0
    [margin.cosface]
    m = 0.35

Each margin keeps its own parameters, so switching `type` never carries one margin's m
into another (ArcFace m = 0.5 rad is not a CosFace m, and SphereFace's m is an integer).
`pipelines.training.step.build_margin` is the one place that turns this into a margin.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ArcFaceParams:
    m: float = 0.5  # additive angular margin (rad): cos(theta + m); the paper's 0.5


@dataclass
class CosFaceParams:
    m: float = 0.35  # additive cosine margin: cos(theta) - m; CosFace's 0.35 (arcface_torch uses 0.4)


@dataclass
class SphereFaceParams:
    """Multiplicative margin cos(m*theta), trained through the softmax mix with lambda
    annealed as max(lambda_min, lambda_base * (1 + gamma*step)^-power) (SphereFace's code)."""

    m: int = 4
    lambda_base: float = 1000.0
    lambda_min: float = 5.0
    gamma: float = 0.12
    power: float = 1.0


@dataclass
class CombinedParams:
    """cos(m1*theta + m2) - m3: the ArcFace paper's combined margin (its CM1 is 1, 0.3, 0.2)."""

    m1: float = 1.0
    m2: float = 0.3
    m3: float = 0.2


MARGINS = ("arcface", "cosface", "sphereface", "combined")


@dataclass
class MarginConfig:
    type: str = "arcface"
    scale: float = 64.0
    # arcface_torch applies the margin under no_grad (d logit / d cos = s at the target);
    # published models were trained that way. Default: the exact derivative.
    straight_through: bool = False
    interclass_filtering_threshold: float = field(default=0.0, metadata={"range": "[0, 1)", "doc": (
        "arcface_torch's abnormal inter-class filtering, in [0, 1), 0 = off: a negative class whose "
        "cosine is above it (likely the same person under another label) counts as cos 0 and gets "
        "no gradient; the target never is (its WF12M noisy-label recipes use 0.4)")})
    arcface: ArcFaceParams = field(default_factory=ArcFaceParams)
    cosface: CosFaceParams = field(default_factory=CosFaceParams)
    sphereface: SphereFaceParams = field(default_factory=SphereFaceParams)
    combined: CombinedParams = field(default_factory=CombinedParams)

    def validate(self) -> None:
        if self.type not in MARGINS:
            raise ValueError(f"margin.type must be one of {', '.join(MARGINS)}, got {self.type!r}")
        if not 0.0 <= self.interclass_filtering_threshold < 1.0:
            raise ValueError("margin.interclass_filtering_threshold must be in [0, 1) (0: off), "
                             f"got {self.interclass_filtering_threshold}")


@dataclass
class TrainConfig:
    """Training (Ray Train). Defaults: the paper's recipe, sized down only where the demo
    needs it (backbone, embedding size, steps) - see configs/demo-train.toml."""

    backbone: str = "iresnet50"
    embedding_size: int = 512
    # Fine-tuning: a backbone state dict to start from (local or s3://), e.g. one of
    # insightface's released IResNet/MobileFaceNet .pth files (same names and shapes as ours).
    init_backbone: str = ""
    # With init_backbone: freeze the stem and the first N of the 4 stages (0 = train all).
    freeze_stages: int = 0
    sample_rate: float = 1.0  # Partial-FC
    subcentres: int = 1
    # The recipe's dataset (arcface_torch's num_classes / num_image); steps come from the data.
    num_classes: int = field(default=0, metadata={"range": "[0, inf)", "doc": (
        "classes the recipe was written for, >= 0: 0 takes whatever the data has; > 0 the data "
        "must have exactly this many (checked before any worker starts)")})
    num_images: int = field(default=0, metadata={"range": "[0, inf)", "doc": (
        "images of the recipe's dataset, >= 0 (0: not said); informational: a refined copy may "
        "hold fewer, and the schedule is counted from the data's own count")})
    batch_size: int = field(default=128, metadata={"doc": (
        "the GLOBAL batch, split evenly over the workers: arcface_torch's recipes give a per-GPU "
        "batch, so 8 GPUs x 128 there is batch_size = 1024 here")})
    epochs: int = 20
    max_steps: int = 0  # > 0: stop there (before the epochs end)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0  # linear warm-up, in optimizer steps (or warmup_epochs, not both)
    warmup_epochs: float = field(default=0.0, metadata={"range": "[0, inf)", "doc": (
        "linear warm-up in epochs, >= 0 (arcface_torch's warmup_epoch): round(warmup_epochs x "
        "steps per epoch) steps; set this or warmup_steps, not both")})
    gradient_accumulation: int = field(default=1, metadata={"range": "[1, inf)", "doc": (
        "micro-batches per optimizer step, >= 1: each worker runs batch_size / (workers x N) "
        "rows at a time and the summed gradient is the whole batch's (batch_size stays the "
        "batch of one step; batch norm sees micro-batches)")})
    poly_power: float = 2.0
    grad_clip: float = 5.0
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 (with a loss scaler) | off
    channels_last: str = "auto"  # auto (on for GPUs) | on | off: the backbone's memory layout
    compile: bool = False  # torch.compile the backbone (its compile time is reported apart)
    # "inductor" generates kernels (GPUs); "aot_eager" traces without code generation. Inductor
    # on CPU crashed (double free) with torch 2.13+cpu here, so it is refused on CPU.
    compile_backend: str = "inductor"
    sync_bn: bool = True  # normalise over the global batch (exact data parallelism)
    workers: int = field(default=2, metadata={"doc": "Ray Train workers in all, over every node (one GPU each with gpu)"})
    gpu: bool = False
    seed: int = 0
    shuffle_rowgroups: int = 4
    decode_threads: int = 2
    storage: str = ""  # absolute path or s3:// (relative: made absolute); "": <services.state_dir>/runs
    name: str = "arcface"
    checkpoint_every: int = 100
    max_failures: int = 2
    # Comma-separated insightface .bin pair sets and *_faces.parquet identification sets;
    # default: the sets that come with the dataset (RefinedDataset.eval_sets).
    eval_sets: str = ""
    eval_every: int = 0  # steps; 0: at the end only
    log_every: int = 10
    mlflow_experiment: str = "arcface"
    # The MLflow registered model the trained embedder is registered under ("" = log the
    # model with the run but do not register it). Needs a tracking URI.
    registered_model: str = "arcface"

    def validate(self) -> None:
        """What no worker count or data can make right (ranges: pipelines.config.RANGES)."""
        if self.warmup_steps > 0 and self.warmup_epochs > 0:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) and train.warmup_epochs "
                             f"({self.warmup_epochs}) are both set: warm up in steps or in epochs, not both")
        if self.gradient_accumulation < 1:
            raise ValueError(f"train.gradient_accumulation must be >= 1, got {self.gradient_accumulation}")
        if self.gradient_accumulation > 1 and self.batch_size % (self.workers * self.gradient_accumulation):
            raise ValueError(f"train.batch_size {self.batch_size} does not split into {self.workers} workers x "
                             f"{self.gradient_accumulation} micro-batches (train.gradient_accumulation)")

    def warmup_steps_for(self, steps_per_epoch: int) -> int:
        """The warm-up length in optimizer steps: warmup_steps, or warmup_epochs counted in
        this data's steps per epoch (arcface_torch: num_image // global batch x warmup_epoch)."""
        if self.warmup_epochs > 0:
            return round(self.warmup_epochs * steps_per_epoch)
        return self.warmup_steps


class RecipeMismatch(ValueError):
    """The data is not the dataset the recipe was written for."""


def check_recipe_matches(manifest, cfg: TrainConfig) -> list[str]:
    """A recipe with `train.num_classes` set trains only on data with that many classes
    (a 93,431-class MS1MV3 recipe on 85,742-class MS1MV2 data is the wrong run): raises
    RecipeMismatch, one line. Returns notes for what only differs in degree (the image
    count: refinement keeps fewer). `manifest`: the dataset's (num_classes, num_images)."""
    if cfg.num_classes and manifest.num_classes != cfg.num_classes:
        raise RecipeMismatch(f"the recipe is for {cfg.num_classes:,} classes (train.num_classes), the data has "
                             f"{manifest.num_classes:,}: use the recipe's dataset, or set train.num_classes = 0 "
                             f"to train on this data with the recipe's other settings")
    notes = []
    if cfg.num_images and manifest.num_images != cfg.num_images:
        notes.append(f"the recipe's dataset has {cfg.num_images:,} images, this data {manifest.num_images:,} "
                     f"({manifest.num_images / cfg.num_images - 1:+.1%}); steps per epoch follow the data")
    return notes
