"""The verification driver's fold (arcface_core.large_scale.TopK, VerificationMerge): exact
whatever the order and the ties, and holding nothing of a block's result by reference (a
result from Ray is a view of its object-store buffer: one kept array pins all of it)."""

import numpy as np
import pytest
import torch

from arcface_core import large_scale as core


def descending_top(values: np.ndarray, k: int) -> np.ndarray:
    return np.sort(values)[::-1][:k]


@pytest.mark.parametrize("k", [0, 1, 7, 100])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_equals_sorting_everything(k, ties):
    rng = np.random.default_rng(k)
    parts = []
    for n in rng.integers(0, 3 * max(k, 1), 40):  # parts shorter and longer than k, some empty
        values = rng.standard_normal(n).astype(np.float32)
        parts.append(np.round(values * 4) / 4 if ties else values)
    top = core.TopK(k)
    for values in parts:
        top.add(values)
    expected = descending_top(np.concatenate(parts), k)
    assert np.array_equal(top.descending().numpy(), expected)
    assert len(top.buffer) == 2 * k  # the one buffer it was given


def test_top_k_fewer_values_than_k_and_increasing_parts():
    top = core.TopK(50)
    for shift in range(10):  # every part beats the last: every add cuts and replaces values
        top.add(np.arange(20, dtype=np.float32) + 10 * shift)
    everything = np.concatenate([np.arange(20, dtype=np.float32) + 10 * s for s in range(10)])
    assert np.array_equal(top.descending().numpy(), descending_top(everything, 50))
    few = core.TopK(50)
    few.add(np.array([2.0, -1.0, 3.0], np.float32))
    assert few.descending().tolist() == [3.0, 2.0, -1.0]


def block_result(rng, k, with_histograms=False):
    coarse = rng.integers(0, 5, core.BINS) if with_histograms else None
    return core.VerificationPartial(
        genuine=[rng.standard_normal(rng.integers(0, 6)).astype(np.float32) for _ in range(3)],
        impostors=int(rng.integers(0, 1000)),
        top=torch.sort(torch.from_numpy(rng.standard_normal(k).astype(np.float32)), descending=True).values,
        coarse=coarse, fine={7: rng.integers(0, 5, core.BINS)} if with_histograms else {})


def test_merge_is_the_sum_of_the_parts_and_keeps_copies():
    rng = np.random.default_rng(0)
    k = 64
    parts = [block_result(rng, k, with_histograms=True) for _ in range(12)]
    merge = core.VerificationMerge(k)
    for part in parts:
        merge.add(part)
    merged = merge.partial()
    assert merged.impostors == sum(p.impostors for p in parts)
    assert np.array_equal(np.concatenate(merged.genuine), np.concatenate([g for p in parts for g in p.genuine]))
    assert np.array_equal(merged.top.numpy(), descending_top(np.concatenate([p.top.numpy() for p in parts]), k))
    assert np.array_equal(merged.coarse, sum(p.coarse for p in parts))
    assert np.array_equal(merged.fine[7], sum(p.fine[7] for p in parts))
    kept = list(merged.genuine) + [merged.coarse, merged.fine[7], merged.top.numpy()]
    for part in parts:
        for array in part.genuine + [part.coarse, part.fine[7], part.top.numpy()]:
            assert not any(np.shares_memory(array, mine) for mine in kept)
