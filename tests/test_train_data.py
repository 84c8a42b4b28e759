"""The training input's per-batch transforms against the per-face reference."""

import cv2
import numpy as np

from pipelines.training.data import decode_face, decode_face_uint8, flip_mask, to_input


def test_batched_normalisation_equals_the_per_face_reference():
    rng = np.random.default_rng(0)
    jpegs = [cv2.imencode(".jpg", rng.integers(0, 255, (112, 112, 3), np.uint8))[1].tobytes() for _ in range(5)]
    flips = [True, False, True, True, False]
    batch = to_input(np.stack([decode_face_uint8(j, f) for j, f in zip(jpegs, flips)]))
    reference = np.stack([decode_face(j, f) for j, f in zip(jpegs, flips)])
    assert batch.shape == (5, 3, 112, 112) and batch.is_contiguous()
    np.testing.assert_allclose(batch.numpy(), reference, atol=1e-6)
    assert batch.min() >= -1 and batch.max() <= 1


def test_flip_mask_is_a_fair_deterministic_coin():
    ids = np.arange(20_000)
    a = flip_mask(0, 3, ids)
    assert np.array_equal(a, flip_mask(0, 3, ids))  # same (seed, epoch, sample): same flip, on any worker
    assert np.array_equal(a[5000:6000], flip_mask(0, 3, ids[5000:6000]))
    assert 0.48 < a.mean() < 0.52
    assert 0.45 < (a != flip_mask(0, 4, ids)).mean() < 0.55  # a new epoch, new flips
    assert 0.45 < (a != flip_mask(1, 3, ids)).mean() < 0.55
