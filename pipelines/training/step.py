"""One rank's model and its training step: the backbone (DDP), this rank's slice of the
class centres (arcface_core's model-parallel margin softmax), both optimizers, AMP.

Gradient accumulation (`train.gradient_accumulation` = N): the step's rows run as N
micro-batches whose losses, each weighted 1/N, add up to the whole batch's mean loss; the
optimizers step once. Partial-FC draws one sample for the whole batch. So the gradient is
the whole batch's wherever the computation is per sample (the classification layer, the
margin, the loss; the backbone in eval mode); batch norm normalises each micro-batch.

Exactness: backbone gradients equal the single-process gradient of the mean loss over
the global batch (the embedding gradient is scaled by the world size to undo DDP's
averaging; batch norm uses global-batch statistics), so N workers follow the same
trajectory as one process on the same global batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import torch

from arcface_core.backbones import build_backbone
from arcface_core.classifier import ShardedMarginClassifier, all_gather_rows
from arcface_core.margins import ArcFace, CombinedMargin, CosFace, MarginSoftmax, SphereFace
from arcface_core.sync_bn import convert_global_batchnorm
from pipelines.training import checkpoint
from pipelines.training.config import MarginConfig, TrainConfig
from pipelines.training.data import device_input

INIT_BLOCK = 4096  # centre initialisation is seeded per block of classes: same on any world size


def build_margin(cfg: MarginConfig) -> MarginSoftmax:
    """The one place a margin is built from config: each margin from its own section."""
    s, st, fil = cfg.scale, cfg.straight_through, cfg.interclass_filtering_threshold
    if cfg.type == "arcface":
        return ArcFace(s, cfg.arcface.m, straight_through=st, interclass_filtering_threshold=fil)
    if cfg.type == "cosface":
        return CosFace(s, cfg.cosface.m, interclass_filtering_threshold=fil)
    if cfg.type == "sphereface":
        p = cfg.sphereface
        return SphereFace(s, p.m, lambda_base=p.lambda_base, lambda_min=p.lambda_min, gamma=p.gamma, power=p.power,
                          interclass_filtering_threshold=fil)
    if cfg.type != "combined":  # the config refuses it at load; a direct caller gets the same line
        raise ValueError(f"margin.type must be one of arcface, cosface, sphereface, combined, got {cfg.type!r}")
    c = cfg.combined
    return CombinedMargin(s, c.m1, c.m2, c.m3, straight_through=st, interclass_filtering_threshold=fil)


def init_centres(num_classes: int, dim: int, k: int, start: int, end: int, seed: int) -> torch.Tensor:
    """N(0, 0.01) centres for classes [start, end), identical whatever the sharding."""
    out = []
    for block in range(start // INIT_BLOCK, (end - 1) // INIT_BLOCK + 1):
        b0, b1 = block * INIT_BLOCK, min(num_classes, (block + 1) * INIT_BLOCK)
        g = torch.Generator().manual_seed(seed * 1_000_003 + block)
        w = torch.normal(0.0, 0.01, ((b1 - b0) * k, dim), generator=g)
        lo, hi = max(start, b0) - b0, min(end, b1) - b0
        out.append(w[lo * k:hi * k])
    return torch.cat(out)


def lr_at(step: int, cfg: TrainConfig, total_steps: int, steps_per_epoch: int = 0) -> float:
    """Linear warm-up, then polynomial decay to 0 at the last step (arcface_torch's schedule).
    The warm-up is `train.warmup_steps`, or `train.warmup_epochs` x `steps_per_epoch`."""
    if cfg.warmup_epochs > 0 and steps_per_epoch <= 0:
        raise ValueError("train.warmup_epochs needs the steps per epoch")
    warmup = cfg.warmup_steps_for(steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, total_steps - warmup)
    return cfg.lr * (1 - (step - warmup) / span) ** cfg.poly_power


def make_optimizer(cfg: TrainConfig, params, device: torch.device | None = None):
    """SGD or AdamW; on a GPU the fused kernels (one launch for all parameters), elsewhere
    the multi-tensor (foreach) ones."""
    fast = {"fused": True} if device is not None and device.type == "cuda" else {"foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fast)


def read_backbone_file(uri: str) -> tuple[dict, str]:
    """A backbone state dict from a .pth file (local or s3://): tensors only
    (`weights_only=True`: never code), a "module." prefix (DDP) dropped; and its SHA-256."""
    from dataset import bounded

    data = bounded.read_torch_file(uri)  # a regular file within the cap, no zip member inflating past it
    state = bounded.torch_loads(data, uri)
    if isinstance(state, dict) and "backbone" in state and isinstance(state["backbone"], dict):
        state = state["backbone"]  # one of our checkpoints' backbone.pt
    if not isinstance(state, dict):
        raise ValueError(f"{uri}: not a state dict (a mapping of parameter names to tensors)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return state, hashlib.sha256(data).hexdigest()


def state_dict_problems(model: torch.nn.Module, state: dict) -> list[str]:
    """Every name or shape that does not match, in words."""
    own = model.state_dict()
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in own.items() if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in own.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return problems


def load_backbone_file(backbone: torch.nn.Module, uri: str, backbone_name: str) -> str:
    """Load an insightface-format state dict into `backbone`; returns the file's SHA-256."""
    state, digest = read_backbone_file(uri)
    problems = state_dict_problems(backbone, state)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"{uri} does not fit backbone {backbone_name!r}: {shown}")
    backbone.load_state_dict(state)
    return digest


def freeze_stages(backbone: torch.nn.Module, stages: int) -> None:
    """No gradients for the stem (conv1, bn1, prelu) and the first `stages` layers."""
    if stages <= 0:
        return
    names = ("conv1", "bn1", "prelu") + tuple(f"layer{i}" for i in range(1, stages + 1))
    for name, param in backbone.named_parameters():
        if name.split(".")[0] in names:
            param.requires_grad_(False)


class Trainee:
    """The model on one rank: backbone (+DDP), this rank's centres, both optimizers."""

    def __init__(self, cfg: TrainConfig, num_classes: int, rank: int, world: int, device: torch.device,
                 margin: MarginConfig | None = None):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        cfg.validate()
        torch.manual_seed(cfg.seed)  # the same backbone initialisation on every rank
        backbone = build_backbone(cfg.backbone, cfg.embedding_size)
        if cfg.init_backbone:  # fine-tuning (a checkpoint, when resuming, overrides it)
            load_backbone_file(backbone, cfg.init_backbone, cfg.backbone)
            freeze_stages(backbone, cfg.freeze_stages)
        if world > 1 and cfg.sync_bn:
            if device.type == "cuda":
                backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
            else:
                backbone = convert_global_batchnorm(backbone)
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
        self.backbone = backbone.to(device, memory_format=torch.channels_last if self.channels_last
                                    else torch.contiguous_format)
        self.head = ShardedMarginClassifier(num_classes, cfg.embedding_size, build_margin(margin or MarginConfig()),
                                            sample_rate=cfg.sample_rate, subcentres=cfg.subcentres,
                                            rank=rank, world_size=world, generator_seed=cfg.seed)
        with torch.no_grad():
            self.head.weight.copy_(init_centres(num_classes, cfg.embedding_size, cfg.subcentres,
                                                self.head.class_start, self.head.class_end, cfg.seed))
        self.head.to(device)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.backbone, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.model = self.backbone
        self.ddp = self.model if world > 1 else None  # its no_sync() skips the all-reduce of early micro-batches
        # Compiled lazily on the first step; that step's wall time is reported as compile time.
        if cfg.compile:
            cfg.check_compile_backend(on_cpu=device.type == "cpu")
            self.model = torch.compile(self.model, backend=cfg.compile_backend)
        self.compile_seconds: float | None = None
        self.opt_backbone = make_optimizer(cfg, [p for p in self.backbone.parameters() if p.requires_grad], device)
        self.opt_head = make_optimizer(cfg, [self.head.weight], device)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _amp_dtype(self):
        mode = self.cfg.amp
        if mode == "auto":
            mode = "bf16" if self.device.type == "cuda" else "off"
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]

    def step(self, images: torch.Tensor, labels: torch.Tensor, lr: float,
             flips: torch.Tensor | None = None) -> torch.Tensor:
        """One optimisation step; returns the loss as a device tensor (reading it is a host
        sync, left to the caller's logging cadence). `images`: the loader's (N, H, W, 3) uint8
        BGR batch (mirrored where `flips`, normalised on the device), or a ready float NCHW
        batch. Nothing in here waits for the device (no .item(), no data-dependent shapes),
        except with fp16, whose loss scaler checks for overflow."""
        first_compiled = self.cfg.compile and self.compile_seconds is None
        started = time.perf_counter() if first_compiled else 0.0
        for opt in (self.opt_backbone, self.opt_head):
            for group in opt.param_groups:
                group["lr"] = lr
        dtype = next(self.backbone.parameters()).dtype
        if images.dtype == torch.uint8:
            images = device_input(images, flips, self.device, dtype, self.channels_last)
        else:
            images = images.to(self.device, dtype=dtype, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        parts = self.cfg.gradient_accumulation
        if images.shape[0] % parts:
            raise ValueError(f"{images.shape[0]} rows on this worker do not split into "
                             f"{parts} micro-batches (train.gradient_accumulation)")
        micro = images.shape[0] // parts
        # Every rank holds an equal share of the global batch (BatchStream enforces it).
        shares = [micro] * self.world
        sampled = None
        if parts > 1 and self.head.sample_rate < 1:  # one Partial-FC sample for the whole batch
            sampled = self.head.draw_sample(all_gather_rows(labels.long(), [images.shape[0]] * self.world))
        self.opt_backbone.zero_grad(set_to_none=True)
        self.opt_head.zero_grad(set_to_none=True)
        losses = []
        for part in range(parts):
            rows = slice(part * micro, (part + 1) * micro)
            last = part == parts - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    embeddings = self.model(images[rows])
                if self.world > 1:
                    # DDP averages backbone gradients over ranks; the loss is already the global mean.
                    embeddings.register_hook(lambda g: g * self.world)
                loss = self.head(embeddings, labels[rows], shares=shares, sampled=sampled)  # fp32 logits
                # each micro-batch's mean loss weighs 1/N: together the whole batch's mean
                self.scaler.scale(loss / parts if parts > 1 else loss).backward()
            losses.append(loss.detach())
        loss = losses[0] if parts == 1 else torch.stack(losses).mean()
        self.scaler.unscale_(self.opt_backbone)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.grad_clip, foreach=True)
        self.scaler.step(self.opt_backbone)
        self.scaler.step(self.opt_head)
        self.scaler.update()
        if first_compiled:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds = time.perf_counter() - started
        return loss

    @property
    def margin(self) -> MarginSoftmax:
        return self.head.margin

    # -- checkpoints (format: pipelines.training.checkpoint) ----------------------------
    def save(self, directory: str, state: dict) -> None:
        momentum = self.opt_head.state.get(self.head.weight, {})
        checkpoint.write_centres(directory, self.head.class_start, self.head.class_end, self.head.weight, momentum)
        if self.rank == 0:
            checkpoint.write_backbone(directory, self.backbone.state_dict(), self.opt_backbone.state_dict(),
                                      self.scaler.state_dict())
            checkpoint.write_state(directory, state)

    def load(self, directory: str) -> dict:
        """Restore from a checkpoint written by any worker count; returns its state."""
        state = checkpoint.read_state(directory)
        blob = checkpoint.read_backbone(directory, map_location=self.device)
        self.backbone.load_state_dict(blob["backbone"])
        self.opt_backbone.load_state_dict(blob["optimizer"])
        self.scaler.load_state_dict(blob["scaler"])
        weight, buffers, opt_step = checkpoint.read_centres(directory, self.head.class_start, self.head.class_end,
                                                            self.cfg.subcentres)
        if weight.shape != self.head.weight.shape:
            raise RuntimeError(f"checkpoint centres are {tuple(weight.shape)}, this rank holds "
                               f"{tuple(self.head.weight.shape)}")
        with torch.no_grad():
            self.head.weight.copy_(weight)
        if buffers:
            st = self.opt_head.state[self.head.weight]
            for name, value in buffers.items():
                st[name] = value.to(self.device)
            if opt_step is not None:
                st["step"] = opt_step
        return state
