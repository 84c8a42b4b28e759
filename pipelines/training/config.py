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

import dataclasses
from dataclasses import dataclass, field

from arcface_core.settings import WORKERS, setting

_COUNT = "[0, inf)"


@dataclass
class ArcFaceParams:
    # An angle: from pi on, cos(theta + m) turns upside down.
    m: float = setting(0.5, range="[0, pi)", doc="additive angular margin (rad): cos(theta + m); the paper's 0.5")


@dataclass
class CosFaceParams:
    # Cosines lie in [-1, 1]: from m = 2 on, the target's logit is below every other class's at any angle.
    m: float = setting(0.35, range="[0, 2)", doc=(
        "additive cosine margin: cos(theta) - m; CosFace's 0.35 (arcface_torch uses 0.4)"))


@dataclass
class SphereFaceParams:
    """Multiplicative margin cos(m*theta), trained through the softmax mix with lambda
    annealed as max(lambda_min, lambda_base * (1 + gamma*step)^-power) (SphereFace's code)."""

    m: int = setting(4, range="[1, 10]", doc="multiplicative angular margin: cos(m*theta); the paper's 4")
    lambda_base: float = setting(1000.0, range=_COUNT, doc="the softmax mix's lambda at step 0")
    lambda_min: float = setting(5.0, range=_COUNT, doc="the least lambda the schedule anneals to")
    gamma: float = setting(0.12, range=_COUNT, doc="lambda's decay rate per step")
    power: float = setting(1.0, range=_COUNT, doc="lambda's decay exponent")


@dataclass
class CombinedParams:
    """cos(m1*theta + m2) - m3: the ArcFace paper's combined margin (its CM1 is 1, 0.3, 0.2)."""

    m1: float = setting(1.0, range="[1, 10]", doc="multiplicative angular margin (SphereFace's m)")
    m2: float = setting(0.3, range="[0, pi)", doc="additive angular margin, rad (ArcFace's m)")
    m3: float = setting(0.2, range="[0, 2)", doc="additive cosine margin (CosFace's m)")


MARGINS = ("arcface", "cosface", "sphereface", "combined")


@dataclass
class MarginConfig:
    type: str = setting("arcface", choices=MARGINS, doc="the margin trained with; its parameters are [margin.<type>]")
    # Above 1024 no real run trains (#31): exp(s) overflows float32 at ~88, fp64 at ~709, and
    # the loss goes NaN.
    scale: float = setting(64.0, range="(0, 1024]", doc="logit scale s: the cosines are multiplied by it")
    # arcface_torch applies the margin under no_grad (d logit / d cos = s at the target);
    # published models were trained that way.
    straight_through: bool = setting(False, doc=(
        "apply the margin without its gradient, as arcface_torch does (default: the exact derivative)"))
    interclass_filtering_threshold: float = setting(0.0, range="[0, 1)", doc=(
        "arcface_torch's abnormal inter-class filtering (0 = off): a negative class whose "
        "cosine is above it (likely the same person under another label) counts as cos 0 and gets "
        "no gradient; the target never is (its WF12M noisy-label recipes use 0.4)"))
    arcface: ArcFaceParams = field(default_factory=ArcFaceParams)
    cosface: CosFaceParams = field(default_factory=CosFaceParams)
    sphereface: SphereFaceParams = field(default_factory=SphereFaceParams)
    combined: CombinedParams = field(default_factory=CombinedParams)


@dataclass
class TrainConfig:
    """Training (Ray Train). Defaults: the paper's recipe, sized down only where the demo
    needs it (backbone, embedding size, steps) - see configs/demo-train.toml."""

    backbone: str = setting("iresnet50", doc="the backbone architecture (arcface_core/backbones)")
    embedding_size: int = setting(512, range="[1, 65536]", doc="dimensions of the embedding")
    # Fine-tuning: e.g. one of insightface's released IResNet/MobileFaceNet .pth files (same
    # names and shapes as ours).
    init_backbone: str = setting("", doc="a backbone state dict to start from (local or s3://); empty: random")
    # IResNets have 4 stages.
    freeze_stages: int = setting(0, range="[0, 4]", doc=(
        "with init_backbone: freeze the stem and the first N of the 4 stages (0 = train all)"))
    sample_rate: float = setting(1.0, range="(0, 1]", doc="Partial-FC: share of the class centres sampled per step")
    subcentres: int = setting(1, range="[1, inf)", doc="sub-centres per class (sub-centre ArcFace; 1: plain)")
    # The recipe's dataset (arcface_torch's num_classes / num_image); steps come from the data.
    num_classes: int = setting(0, range=_COUNT, doc=(
        "classes the recipe was written for: 0 takes whatever the data has; > 0 the data "
        "must have exactly this many (checked before any worker starts)"))
    num_images: int = setting(0, range=_COUNT, doc=(
        "images of the recipe's dataset (0: not said); informational: a refined copy may "
        "hold fewer, and the schedule is counted from the data's own count"))
    batch_size: int = setting(128, range="[1, inf)", doc=(
        "the GLOBAL batch, split evenly over the workers: arcface_torch's recipes give a per-GPU "
        "batch, so 8 GPUs x 128 there is batch_size = 1024 here"))
    epochs: int = setting(20, range=_COUNT, doc="passes over the data (at least 1, unless max_steps is set)")
    max_steps: int = setting(0, range=_COUNT, doc="> 0: stop there (before the epochs end)")
    optimizer: str = setting("sgd", choices=("sgd", "adamw"), doc="the optimizer")
    # No real run needs more than 10, and a rate above it trains nothing (#31).
    lr: float = setting(0.1, range="(0, 10]", doc="peak learning rate (after warm-up, decayed polynomially)")
    momentum: float = setting(0.9, range="[0, 1)", doc="SGD momentum")
    weight_decay: float = setting(5e-4, range="[0, 1]", doc="weight decay")
    warmup_steps: int = setting(0, range=_COUNT, doc="linear warm-up, in optimizer steps (or warmup_epochs, not both)")
    warmup_epochs: float = setting(0.0, range=_COUNT, doc=(
        "linear warm-up in epochs (arcface_torch's warmup_epoch): round(warmup_epochs x "
        "steps per epoch) steps; set this or warmup_steps, not both"))
    gradient_accumulation: int = setting(1, range="[1, inf)", doc=(
        "micro-batches per optimizer step: each worker runs batch_size / (workers x N) "
        "rows at a time and the summed gradient is the whole batch's (batch_size stays the "
        "batch of one step; batch norm sees micro-batches)"))
    poly_power: float = setting(2.0, range=_COUNT, doc="exponent of the polynomial decay of the learning rate")
    grad_clip: float = setting(5.0, range=_COUNT, doc="clip the backbone's gradient norm to this (0: no clipping)")
    amp: str = setting("auto", choices=("auto", "bf16", "fp16", "off"), doc=(
        "mixed precision: auto (bf16 on GPU, off on CPU), bf16, fp16 (with a loss scaler) or off"))
    channels_last: str = setting("auto", choices=("auto", "on", "off"), doc=(
        "the backbone's memory layout: auto (channels_last on GPUs), on or off"))
    compile: bool = setting(False, doc="torch.compile the backbone (its compile time is reported apart)")
    # Inductor on CPU crashed (double free) with torch 2.13+cpu here, so it is refused on CPU
    # (check_compile_backend).
    compile_backend: str = setting("inductor", doc=(
        "torch.compile's backend: inductor generates kernels (GPUs); aot_eager traces without code generation"))
    sync_bn: bool = setting(True, doc="normalise over the global batch (exact data parallelism)")
    workers: int = setting(2, range=WORKERS, doc="Ray Train workers in all, over every node (one GPU each with gpu)")
    gpu: bool = setting(False, doc="train on GPUs, one per worker")
    seed: int = setting(0, range=_COUNT, doc=(
        "random seed of the initialisation, the data order and Partial-FC's sampling"))
    shuffle_rowgroups: int = setting(4, range="[1, inf)", doc="row groups shuffled together (the shuffle buffer)")
    decode_threads: int = setting(2, range="[1, 256]", doc="JPEG decoding threads per worker")
    storage: str = setting("", doc=(
        "where checkpoints go: absolute path or s3:// (relative: made absolute); empty: <services.state_dir>/runs"))
    name: str = setting("arcface", doc="the run's name (its folder under storage)")
    checkpoint_every: int = setting(100, range="[1, inf)", doc="steps between checkpoints")
    max_failures: int = setting(2, range="[0, 100]", doc="times Ray Train restarts the run from its last checkpoint")
    eval_sets: str = setting("", doc=(
        "comma-separated insightface .bin pair sets and *_faces.parquet identification sets; "
        "empty: the sets that come with the dataset"))
    eval_every: int = setting(0, range=_COUNT, doc="steps between evaluations (0: at the end only)")
    log_every: int = setting(10, range="[1, inf)", doc="steps between logged losses")
    mlflow_experiment: str = setting("arcface", doc="the MLflow experiment runs are logged under")
    # Registering needs a tracking URI.
    registered_model: str = setting("arcface", doc=(
        "the MLflow registered model the trained embedder is registered under (empty: logged, not registered)"))

    def validate(self) -> None:
        """Rules between settings (each setting's own range or choices is declared beside it
        and checked by pipelines.config.validate)."""
        if self.epochs < 1 and self.max_steps <= 0:
            raise ValueError("train.epochs must be >= 1 (or set train.max_steps)")
        if self.warmup_steps > 0 and self.warmup_epochs > 0:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) and train.warmup_epochs "
                             f"({self.warmup_epochs}) are both set: warm up in steps or in epochs, not both")
        if self.gradient_accumulation > 1 and self.batch_size % (self.workers * self.gradient_accumulation):
            raise ValueError(f"train.batch_size {self.batch_size} does not split into {self.workers} workers x "
                             f"{self.gradient_accumulation} micro-batches (train.gradient_accumulation)")

    def check_compile_backend(self, on_cpu: bool) -> None:
        """Refuse what crashed: the inductor backend on CPU. Checked against the device the
        config asks for when it is loaded (train.gpu), and against the one a worker got."""
        if self.compile and self.compile_backend == "inductor" and on_cpu:
            raise ValueError("train.compile with the inductor backend crashed on CPU builds of torch 2.13 (double "
                             "free): on CPU set train.compile_backend = \"aot_eager\", or train on GPUs")

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


def config_section(kind, values: dict):
    """A config dataclass (with nested sections) from its asdict() form."""
    kwargs = {}
    for f in dataclasses.fields(kind):
        if f.name in values:
            value = values[f.name]
            kwargs[f.name] = config_section(f.default_factory, value) if isinstance(value, dict) else value
    return kind(**kwargs)
