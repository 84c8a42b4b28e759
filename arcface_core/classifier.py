"""Model-parallel classification layer: class centres sharded across ranks.

Rank r owns the centres of a contiguous class range (uneven splits allowed). Each step:

1. embeddings and labels of the whole global batch are all-gathered (B x D, small);
2. each rank computes cosine logits for its own classes only (B x C_r, never B x C);
3. the margin is applied where the target class is local;
4. the softmax normaliser is combined across ranks: all-reduce MAX of the row maxima,
   all-reduce SUM of the exp-sums and of the target logits;
5. loss = mean over the global batch of log Σ exp − target logit.

The loss and the gradients to the embeddings and to every centre shard equal the
single-process computation. Every rank ends with the same loss; the collectives' backward
passes are written so that calling `backward()` on it on every rank gives each rank
exactly its part of the single-process gradient (no factor of world size).

Partial-FC (An et al.): with sample_rate r < 1 each rank keeps all positive centres of the
global batch in its range plus random negatives, `ceil(r·C_r)` in all; only those
centres take part (and get gradients). r = 1 is plain model parallelism. Gradient
accumulation draws the sample once for the whole step (`draw_sample`) and passes it to each
micro-batch's forward, so N micro-batches use the centres the whole batch would have.

World size 1 (or no process group) runs the same code with the collectives as no-ops.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from arcface_core.margins import MarginSoftmax, interclass_filter_mask, subcentre_max


def class_ranges(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) per rank; the first `C mod W` ranks hold one class more."""
    if num_classes < world_size:
        raise ValueError(f"{num_classes} classes cannot be split over {world_size} ranks")
    base, extra = divmod(num_classes, world_size)
    ranges, start = [], 0
    for r in range(world_size):
        end = start + base + (1 if r < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Reduced precision becomes float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the gradient over ranks and keeps our slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int]):
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        # all_gather needs equal shapes (gloo insists): pad to the largest share, then trim.
        longest = max(sizes)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce autograd's buffer in place
        # Each rank's loss graph only saw its own classes: the full gradient is the sum.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward is the identity because every rank continues identically."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def gathered_sizes(local: torch.Tensor) -> list[int]:
    """Every rank's number of rows (ranks may hold uneven shares of the batch)."""
    n = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    return [int(s) for s in sizes]


def all_gather_rows(local: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    if not _distributed():
        return local
    return _AllGather.apply(local, sizes if sizes is not None else gathered_sizes(local))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x) if _distributed() else x


def all_reduce_max_(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


class ShardedMarginClassifier(nn.Module):
    """This rank's share of the class centres, and the distributed margin softmax loss.

    Args:
        num_classes: classes in the whole dataset.
        embedding_size: D.
        margin: a MarginSoftmax (ArcFace, CosFace, SphereFace, CombinedMargin).
        sample_rate: Partial-FC rate r in (0, 1].
        subcentres: K for sub-centre ArcFace (K centres per class, class logit = max).
        rank, world_size: default to the process group (1 process without one).
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: MarginSoftmax, sample_rate: float = 1.0,
                 subcentres: int = 1, rank: int | None = None, world_size: int | None = None,
                 generator_seed: int = 0):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError("sample_rate must be in (0, 1]")
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if _distributed() else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if _distributed() else 0)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.class_start, self.class_end = class_ranges(num_classes, self.world_size)[self.rank]
        self.num_local = self.class_end - self.class_start
        self.margin, self.sample_rate, self.k = margin, float(sample_rate), int(subcentres)
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local * self.k, embedding_size)))
        self._seed = generator_seed + 7919 * self.rank
        self._generator: torch.Generator | None = None
        self.last_sampled: torch.Tensor | None = None  # local class indices used in the last step

    # -- Partial-FC ------------------------------------------------------------------
    def num_sampled(self) -> int:
        return self.num_local if self.sample_rate >= 1.0 else max(1, math.ceil(self.sample_rate * self.num_local))

    def local_targets(self, labels_global: torch.Tensor) -> torch.Tensor:
        """Global labels -> this rank's class index (-1: the class lives on another rank)."""
        in_range = (labels_global >= self.class_start) & (labels_global < self.class_end)
        return torch.where(in_range, labels_global - self.class_start, torch.full_like(labels_global, -1))

    def draw_sample(self, labels_global: torch.Tensor) -> torch.Tensor:
        """The Partial-FC sample (sorted local class indices) for a step whose global batch
        has these labels (every rank's rows, the same tensor on every rank): for gradient
        accumulation, which passes it to every micro-batch's forward as `sampled`."""
        return self.sample(self.local_targets(labels_global.long()))[0]

    def sample(self, local_labels: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted local class indices to use, and labels remapped into them (-1: not here).
        `index`: a sample drawn before (`draw_sample`) that holds every positive here."""
        if self.sample_rate >= 1.0:
            return torch.arange(self.num_local, device=local_labels.device), local_labels
        if index is not None:
            return index, self._remap(index, local_labels)
        if self._generator is None or self._generator.device != local_labels.device:
            self._generator = torch.Generator(device=local_labels.device).manual_seed(self._seed)
        # Random scores for every local class; positives get 2.0 so top-k always keeps them.
        score = torch.rand(self.num_local, device=local_labels.device, generator=self._generator)
        valid = local_labels >= 0
        positive_mark = torch.where(valid, 2.0, 0.0).to(score.dtype)
        score.scatter_reduce_(0, local_labels.clamp_min(0), positive_mark, reduce="amax")
        k = self.num_sampled()
        if k < local_labels.numel():
            # More positives than the sample size is possible only then; counting them
            # costs a host sync, which large-class training (k >= batch) never pays.
            k = max(k, int((score > 1.5).sum()))
        index = torch.topk(score, k=k, sorted=False).indices.sort().values
        return index, self._remap(index, local_labels)

    @staticmethod
    def _remap(index: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        remapped = torch.searchsorted(index, local_labels.clamp_min(0))
        return torch.where(local_labels >= 0, remapped, torch.full_like(local_labels, -1))

    # -- forward -----------------------------------------------------------------------
    def selected_centres(self, index: torch.Tensor) -> torch.Tensor:
        """The (n·K, D) centres taking part this step, at least fp32 (a copy only when
        Partial-FC selects or the weights are in reduced precision)."""
        weight = self.weight.view(self.num_local, self.k, self.embedding_size)
        if index.numel() != self.num_local:
            weight = weight[index]
        return _at_least_fp32(weight.reshape(-1, self.embedding_size))

    def local_logits(self, embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Cosines between the gathered embeddings and the selected local centres, fp32."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            w = self.selected_centres(index)
            e = F.normalize(_at_least_fp32(embeddings), dim=1)
            # Divide the (B x n) product by the centre norms rather than normalising the
            # (n x D) centres: no second copy of the shard, which is the big tensor here.
            norms = torch.linalg.vector_norm(w, dim=1).clamp_min(1e-12)
            cos = F.linear(e, w) / norms
        return subcentre_max(cos, self.k)[0] if self.k > 1 else cos

    def forward(self, local_embeddings: torch.Tensor, local_labels_global: torch.Tensor,
                shares: list[int] | None = None, fused: bool = True,
                sampled: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over the global batch (the same value on every rank).

        shares: every rank's number of rows when the caller knows them (equal splits):
            saves the all-gather of sizes, a host synchronisation, every step.
        fused: one autograd node from cosines to loss that holds a single B x n buffer
            (`margin_softmax_loss`); False composes the same math from autograd ops
            (several B x n buffers; the reference the fused node is tested against).
            Sub-centres (K > 1) always take the composed path.
        sampled: a Partial-FC sample from `draw_sample` (gradient accumulation: one sample
            for all micro-batches of a step); None draws one for this batch.
        """
        if _distributed() and shares is None:
            shares = gathered_sizes(local_embeddings)  # once for both gathers
        embeddings = all_gather_rows(local_embeddings, shares)
        labels = all_gather_rows(local_labels_global.long(), shares)
        index, target = self.sample(self.local_targets(labels), sampled)
        self.last_sampled = index
        if fused and self.k == 1:
            with torch.autocast(device_type=embeddings.device.type, enabled=False):
                e = F.normalize(_at_least_fp32(embeddings), dim=1)
                return margin_softmax_loss(e, self.selected_centres(index), target, self.margin)
        logits = self.margin(self.local_logits(embeddings, index), target)
        return distributed_cross_entropy(logits, target)

    @torch.no_grad()
    def nearest_subcentre(self, embeddings: torch.Tensor, labels_global: torch.Tensor) -> torch.Tensor:
        """For samples whose class is on this rank: which of its K sub-centres is nearest (-1 elsewhere)."""
        in_range = (labels_global >= self.class_start) & (labels_global < self.class_end)
        local = (labels_global - self.class_start).clamp(0, self.num_local - 1)
        w = F.normalize(self.weight.float(), dim=1).view(self.num_local, self.k, -1)[local]  # (B, K, D)
        cos = torch.einsum("bkd,bd->bk", w, F.normalize(embeddings.float(), dim=1))
        return torch.where(in_range, cos.argmax(1), torch.full_like(local, -1))


def distributed_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy whose classes are split across ranks (columns here, -1 = target elsewhere)."""
    with torch.no_grad():
        # Any per-row constant keeps softmax exact; the global max keeps exp() in range.
        row_max = all_reduce_max_(logits.max(dim=1).values)
    shifted = logits - row_max.unsqueeze(1)
    sum_exp = all_reduce_sum(shifted.exp().sum(dim=1))
    valid = target >= 0
    picked = shifted.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
    target_logit = all_reduce_sum(torch.where(valid, picked, torch.zeros_like(picked)))
    return (sum_exp.log() - target_logit).mean()


class _MarginSoftmaxLoss(torch.autograd.Function):
    """cosines -> margin at the target -> softmax over all ranks' classes -> mean loss, in one
    node that owns a single B x n buffer: the cosines become the logits, then the
    probabilities (in place), and backward turns them into the gradient (in place again).
    The composed path allocates ~6 of them (product, cosines, margin scatter, scaled logits,
    shifted logits, exp) and autograd keeps several alive until backward; at 2M classes a
    B x n fp32 buffer is the largest tensor of the step.

    cos_ij = e_i . w_j / |w_j| with e unit rows (normalised outside), g = dL/dcos:
        dL/de_i = sum_j (g_ij / |w_j|) w_j
        dL/dw_j = H_j - (H_j . w_j) w_j / |w_j|^2,   H = (g / |w|)^T e
    The target column's dL/dcos is chained through the margin's d target_cos / d cos,
    taken by autograd on the B target cosines only (1 with the straight-through option).

    Inter-class filtering (margin.interclass_filtering_threshold > 0): filtered negatives'
    cosines become 0 before the margin (their exp(0 - max) stays in the normaliser) and their
    probabilities are zeroed after it, so backward's p - onehot gives them no gradient. The
    mask is a transient B x n bool, freed before backward.
    """

    @staticmethod
    def forward(ctx, e, w, target, margin):
        norms = torch.linalg.vector_norm(w, dim=1).clamp_min(1e-12)
        buf = torch.mm(e, w.t()).div_(norms)  # the one B x n buffer: cosines
        valid = target >= 0
        column = target.clamp_min(0).unsqueeze(1)
        dirty = interclass_filter_mask(buf, target, margin.interclass_filtering_threshold)
        if dirty is not None:
            buf.masked_fill_(dirty, 0.0)
        cos_t = buf.gather(1, column).squeeze(1)
        with torch.enable_grad():
            leaf = cos_t.detach().requires_grad_(True)
            new_t = margin.target_cos(leaf)
            slope = (torch.ones_like(cos_t) if margin.straight_through
                     else torch.autograd.grad(new_t.sum(), leaf)[0])
        new_t = new_t.detach()
        s = margin.s
        buf.scatter_(1, column, torch.where(valid, new_t, cos_t).unsqueeze(1)).mul_(s)  # logits
        row_max = all_reduce_max_(buf.max(dim=1).values)
        buf.sub_(row_max.unsqueeze(1)).exp_()
        sum_exp = buf.sum(dim=1)
        target_logit = torch.where(valid, s * new_t - row_max, torch.zeros_like(row_max))
        if _distributed():  # the normaliser and the target logit live on different ranks
            both = torch.stack([sum_exp, target_logit])
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            sum_exp, target_logit = both[0], both[1]
        buf.div_(sum_exp.unsqueeze(1))  # probabilities
        if dirty is not None:
            buf.masked_fill_(dirty, 0.0)  # filtered negatives take no gradient
            del dirty
        ctx.save_for_backward(buf, e, w, norms, column, valid, slope)
        ctx.s = s
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        g, e, w, norms, column, valid, slope = ctx.saved_tensors
        # d loss / d logits = (p - onehot) / B; logits = s * (cos, or target_cos at the target)
        g.scatter_add_(1, column, torch.where(valid, -1.0, 0.0).to(g.dtype).unsqueeze(1))
        g.mul_(grad_loss * ctx.s / g.shape[0])
        at_target = g.gather(1, column).squeeze(1)
        g.scatter_(1, column, torch.where(valid, at_target * slope, at_target).unsqueeze(1))
        g.div_(norms)  # now dL/d(e . w_j)
        grad_e = torch.mm(g, w)
        h = torch.mm(g.t(), e)
        grad_w = h - ((h * w).sum(dim=1) / norms.square()).unsqueeze(1) * w
        return grad_e, grad_w, None, None


def margin_softmax_loss(unit_embeddings: torch.Tensor, centres: torch.Tensor, target: torch.Tensor,
                        margin: MarginSoftmax) -> torch.Tensor:
    """Mean margin-softmax cross entropy over the global batch; the classes are this rank's
    `centres` (target -1: the row's class is elsewhere). Equal to
    `distributed_cross_entropy(margin(cosines), target)`, holding one B x n buffer."""
    return _MarginSoftmaxLoss.apply(unit_embeddings, centres, target, margin)
