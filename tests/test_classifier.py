"""The sharded margin softmax against the single-process computation (values and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from arcface_core.classifier import ShardedMarginClassifier, class_ranges, distributed_cross_entropy, margin_softmax_loss
from arcface_core.margins import ArcFace, CombinedMargin, CosFace, SphereFace, subcentre_max

from dist_helpers import run_distributed

C, D, K = 11, 8, 1
BATCH_SIZES = {2: [5, 4], 3: [3, 4, 2]}  # uneven per-rank batches too


def make_problem(world: int, k: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(BATCH_SIZES[world]) if world in BATCH_SIZES else 9
    weight = torch.randn(C * k, D, generator=g, dtype=torch.float64).float()
    emb = torch.randn(n, D, generator=g, dtype=torch.float64).float()
    labels = torch.randint(0, C, (n,), generator=g)
    return weight, emb, labels


def reference(weight, emb, labels, margin, k=1, classes=None):
    """Plain single-process loss: all centres (or the given classes only), torch cross_entropy."""
    weight = weight.clone().requires_grad_(True)
    emb = emb.clone().requires_grad_(True)
    w = weight.view(C, k, D)
    target = labels
    if classes is not None:
        w = w[classes]
        target = torch.searchsorted(classes, labels)
    cos = F.linear(F.normalize(emb, dim=1), F.normalize(w.reshape(-1, D), dim=1))
    cos = subcentre_max(cos, k)[0]
    loss = F.cross_entropy(margin(cos, target), target)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


def _margin(name):
    return {"arcface": ArcFace(s=16.0, m=0.5), "cosface": CosFace(s=16.0),
            "combined": CombinedMargin(16.0, 1.2, 0.3, 0.1),
            # thresholds that filter some of the random problem's negatives (D = 8)
            "arcface-filter": ArcFace(s=16.0, m=0.5, interclass_filtering_threshold=0.3),
            "cosface-filter": CosFace(s=16.0, interclass_filtering_threshold=0.2)}[name]


def sharded_worker(rank, world, margin_name, k, sample_rate, fused=True):
    weight, emb, labels = make_problem(world, k)
    start, end = class_ranges(C, world)[rank]
    layer = ShardedMarginClassifier(C, D, _margin(margin_name), sample_rate=sample_rate, subcentres=k)
    with torch.no_grad():
        layer.weight.copy_(weight[start * k:end * k])
    sizes = BATCH_SIZES[world]
    lo = sum(sizes[:rank])
    local_emb = emb[lo:lo + sizes[rank]].clone().requires_grad_(True)
    loss = layer(local_emb, labels[lo:lo + sizes[rank]], fused=fused)
    loss.backward()
    return {"loss": loss.detach(), "emb_grad": local_emb.grad, "weight_grad": layer.weight.grad,
            "sampled": layer.last_sampled + start, "num_sampled": torch.tensor(layer.num_sampled())}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("margin_name, k, fused", [("arcface", 1, True), ("cosface", 1, True), ("combined", 1, True),
                                                   ("arcface", 1, False), ("arcface", 3, True)])
def test_sharded_equals_single_process(tmp_path, world, margin_name, k, fused):
    results = run_distributed(sharded_worker, world, (margin_name, k, 1.0, fused), str(tmp_path))
    weight, emb, labels = make_problem(world, k)
    loss, emb_grad, weight_grad = reference(weight, emb, labels, _margin(margin_name), k)
    sizes = BATCH_SIZES[world]
    for rank, res in enumerate(results):
        start, end = class_ranges(C, world)[rank]
        lo = sum(sizes[:rank])
        torch.testing.assert_close(res["loss"], loss.float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(res["emb_grad"], emb_grad[lo:lo + sizes[rank]], atol=1e-5, rtol=0)
        torch.testing.assert_close(res["weight_grad"], weight_grad[start * k:end * k], atol=1e-5, rtol=0)


def test_uneven_class_ranges():
    assert class_ranges(11, 3) == [(0, 4), (4, 8), (8, 11)]
    assert class_ranges(5, 1) == [(0, 5)]
    with pytest.raises(ValueError):
        class_ranges(2, 3)


@pytest.mark.parametrize("world", [2, 3])
def test_partial_fc_matches_loss_on_sampled_classes(tmp_path, world):
    margin_name, rate = "arcface", 0.5
    results = run_distributed(sharded_worker, world, (margin_name, 1, rate), str(tmp_path))
    weight, emb, labels = make_problem(world)
    sampled = torch.cat([r["sampled"] for r in results]).sort().values
    for rank, res in enumerate(results):
        start, end = class_ranges(C, world)[rank]
        mine = res["sampled"]
        positives = labels[(labels >= start) & (labels < end)].unique()
        assert set(positives.tolist()) <= set(mine.tolist()), "every positive centre is sampled"
        assert len(mine) == max(math.ceil(rate * (end - start)), len(positives))
        assert len(mine.unique()) == len(mine)
        # Unsampled centres get exactly zero gradient.
        unsampled = sorted(set(range(start, end)) - set(mine.tolist()))
        if unsampled:
            assert res["weight_grad"][torch.tensor(unsampled) - start].abs().max() == 0
    loss, emb_grad, weight_grad = reference(weight, emb, labels, _margin(margin_name), classes=sampled)
    sizes = BATCH_SIZES[world]
    for rank, res in enumerate(results):
        lo = sum(sizes[:rank])
        torch.testing.assert_close(res["loss"], loss, atol=1e-5, rtol=0)
        torch.testing.assert_close(res["emb_grad"], emb_grad[lo:lo + sizes[rank]], atol=1e-5, rtol=0)


def test_world_size_one_without_process_group():
    weight, emb, labels = make_problem(1)
    layer = ShardedMarginClassifier(C, D, ArcFace(s=16.0))
    with torch.no_grad():
        layer.weight.copy_(weight)
    e = emb.clone().requires_grad_(True)
    loss = layer(e, labels)
    loss.backward()
    ref_loss, ref_emb_grad, ref_w_grad = reference(weight, emb, labels, ArcFace(s=16.0))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(e.grad, ref_emb_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.weight.grad, ref_w_grad, atol=1e-5, rtol=0)


def test_partial_fc_sample_size_and_positives_single_rank():
    layer = ShardedMarginClassifier(1000, D, ArcFace(), sample_rate=0.1)
    labels = torch.randint(0, 1000, (64,))
    emb = torch.randn(64, D)
    layer(emb, labels)
    assert len(layer.last_sampled) == 100
    assert set(labels.tolist()) <= set(layer.last_sampled.tolist())
    # More positives than the sample size: all positives, nothing else.
    labels = torch.arange(0, 1000, 5)  # 200 distinct positives > 100
    layer(torch.randn(200, D), labels)
    assert layer.last_sampled.tolist() == labels.tolist()


def test_logits_stay_fp32_under_autocast():
    layer = ShardedMarginClassifier(50, D, ArcFace())
    emb = torch.randn(4, D).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.local_logits(emb, torch.arange(50))
        loss = layer(emb, torch.tensor([1, 2, 3, 4]))
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_nearest_subcentre():
    layer = ShardedMarginClassifier(2, 2, ArcFace(), subcentres=3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [1, 1], [0, -1], [-1, 1]]))
    emb = torch.tensor([[0.1, 1.0], [-1.0, 0.9]])
    assert layer.nearest_subcentre(emb, torch.tensor([0, 1])).tolist() == [1, 2]


@pytest.mark.parametrize("margin", [ArcFace(s=16.0, m=0.5), ArcFace(s=64.0, m=0.5, straight_through=True),
                                    CosFace(s=30.0), CombinedMargin(16.0, 1.2, 0.3, 0.1), SphereFace(16.0, m=4),
                                    ArcFace(s=16.0, m=0.5, interclass_filtering_threshold=0.2),
                                    CosFace(s=30.0, interclass_filtering_threshold=0.1)],
                         ids=["arcface", "arcface-straight-through", "cosface", "combined", "sphereface",
                              "arcface-filter", "cosface-filter"])
def test_fused_loss_equals_the_composed_one_in_float64(margin):
    """The one-buffer autograd node against the same math composed from autograd ops:
    values and both gradients, with rows whose class is elsewhere (target -1) and
    unnormalised centres, near-±1 cosines included."""
    g = torch.Generator().manual_seed(3)
    e = F.normalize(torch.randn(12, D, generator=g, dtype=torch.float64), dim=1)
    w = torch.randn(7, D, generator=g, dtype=torch.float64) * 3
    w[2] = e[0] * 2.5  # cos = 1 for row 0 (target 2)
    w[5] = -e[1]  # cos = -1 for row 1 (target 5)
    target = torch.tensor([2, 5, 0, -1, 6, 3, -1, 1, 4, 2, 0, -1])
    if isinstance(margin, SphereFace):
        margin.set_step(40)
    e1, w1 = e.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fused = margin_softmax_loss(e1, w1, target, margin)
    fused.backward()
    e2, w2 = e.clone().requires_grad_(True), w.clone().requires_grad_(True)
    cos = F.linear(e2, w2) / torch.linalg.vector_norm(w2, dim=1)
    composed = distributed_cross_entropy(margin(cos, target), target)
    composed.backward()
    torch.testing.assert_close(fused, composed, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(e1.grad, e2.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-12, rtol=1e-10)
    assert torch.isfinite(e1.grad).all() and torch.isfinite(w1.grad).all()


def test_fused_loss_keeps_one_batch_by_classes_buffer():
    """Count the B x n allocations of forward + backward through the dispatcher: the fused
    node makes one and reuses it for the probabilities and the gradient."""
    from arcface_core.memory import count_new_buffers

    b, n = 16, 4096

    def run(fused):
        layer = ShardedMarginClassifier(n, D, ArcFace(s=16.0))
        emb = torch.randn(b, D, requires_grad=True)
        labels = torch.randint(0, n, (b,))
        return count_new_buffers(lambda: layer(emb, labels, fused=fused).backward(), (b, n))

    assert run(True) == 1
    assert run(False) >= 5  # what the fused node saves


# (margin, K, fused, Partial-FC rate): inter-class filtering on every path of the layer
FILTER_CASES = [("arcface-filter", 1, True, 1.0), ("cosface-filter", 1, True, 1.0), ("arcface-filter", 1, False, 1.0),
                ("cosface-filter", 3, True, 1.0), ("arcface-filter", 1, True, 0.5)]


def filtering_worker(rank, world):
    """Every FILTER_CASES case in one set of processes (a process group costs seconds)."""
    out = {}
    for i, (name, k, fused, rate) in enumerate(FILTER_CASES):
        out.update({f"{i}.{key}": value for key, value in sharded_worker(rank, world, name, k, rate, fused).items()})
    return out


def test_interclass_filtering_sharded_equals_single_process(tmp_path):
    """Filtered negatives on 3 ranks (uneven classes and batch shares) equal the single-process
    filtered loss: values, embedding and centre gradients; fused and composed paths,
    sub-centres, Partial-FC (compared on the classes the ranks sampled)."""
    world, sizes = 3, BATCH_SIZES[3]
    results = run_distributed(filtering_worker, world, (), str(tmp_path))
    for i, (name, k, _, rate) in enumerate(FILTER_CASES):
        weight, emb, labels = make_problem(world, k)
        sampled = torch.cat([r[f"{i}.sampled"] for r in results]).sort().values if rate < 1 else None
        loss, emb_grad, weight_grad = reference(weight, emb, labels, _margin(name), k, classes=sampled)
        for rank, res in enumerate(results):
            start, end = class_ranges(C, world)[rank]
            lo = sum(sizes[:rank])
            torch.testing.assert_close(res[f"{i}.loss"], loss.float(), atol=1e-5, rtol=0, msg=f"case {i}")
            torch.testing.assert_close(res[f"{i}.emb_grad"], emb_grad[lo:lo + sizes[rank]], atol=1e-5, rtol=0)
            if rate == 1.0:
                torch.testing.assert_close(res[f"{i}.weight_grad"], weight_grad[start * k:end * k], atol=1e-5, rtol=0)


def test_the_filtering_problem_filters_some_negatives():
    """The sharded filtering tests above mean something only if the threshold bites: some
    negatives of the shared random problem are above it, and filtering changes the loss."""
    from arcface_core.margins import interclass_filter_mask

    weight, emb, labels = make_problem(3)
    cos = F.linear(F.normalize(emb, dim=1), F.normalize(weight, dim=1))
    for name in ("arcface-filter", "cosface-filter"):
        margin = _margin(name)
        assert interclass_filter_mask(cos, labels, margin.interclass_filtering_threshold).sum() >= 3
        plain = ArcFace(s=16.0, m=0.5) if name.startswith("arcface") else CosFace(s=16.0)
        assert not torch.isclose(reference(weight, emb, labels, margin)[0], reference(weight, emb, labels, plain)[0])


def test_draw_sample_then_micro_batches_use_the_whole_batch_sample():
    """Gradient accumulation's Partial-FC: one sample for the step's global labels, passed to
    each micro-batch, gives the loss on the same classes as the whole batch in one forward
    (mean of the micro-batch losses = whole-batch loss), and both draw the same sample."""
    weight, emb, labels = make_problem(1)
    whole, split = (ShardedMarginClassifier(C, D, ArcFace(s=16.0), sample_rate=0.4, generator_seed=3)
                    for _ in range(2))
    for layer in (whole, split):
        with torch.no_grad():
            layer.weight.copy_(weight)
    loss = whole(emb, labels)
    index = split.draw_sample(labels)
    assert torch.equal(index, whole.last_sampled)
    halves = [split(emb[part], labels[part], sampled=index) for part in (slice(0, 4), slice(4, 9))]
    torch.testing.assert_close((4 * halves[0] + 5 * halves[1]) / 9, loss, atol=1e-6, rtol=0)
