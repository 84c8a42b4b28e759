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
    arcface: ArcFaceParams = field(default_factory=ArcFaceParams)
    cosface: CosFaceParams = field(default_factory=CosFaceParams)
    sphereface: SphereFaceParams = field(default_factory=SphereFaceParams)
    combined: CombinedParams = field(default_factory=CombinedParams)

    def validate(self) -> None:
        if self.type not in MARGINS:
            raise ValueError(f"margin.type must be one of {', '.join(MARGINS)}, got {self.type!r}")


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
    batch_size: int = field(default=128, metadata={"doc": (
        "the GLOBAL batch, split evenly over the workers: arcface_torch's recipes give a per-GPU "
        "batch, so 8 GPUs x 128 there is batch_size = 1024 here")})
    epochs: int = 20
    max_steps: int = 0  # > 0: stop there (before the epochs end)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
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
