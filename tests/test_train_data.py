"""The training input's batch path against the per-face reference."""

import cv2
import numpy as np
import pytest
import torch

from pipelines.training.data import decode_face, decode_into, decode_normalised_into, device_input, flip_mask


def _jpegs(n, size=112, seed=0):
    rng = np.random.default_rng(seed)
    return [cv2.imencode(".jpg", rng.integers(0, 255, (size, size, 3), np.uint8))[1].tobytes() for _ in range(n)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_path_equals_the_per_face_reference(channels_last):
    jpegs = _jpegs(5)
    flips = torch.tensor([True, False, True, True, False])
    raw = torch.empty((5, 112, 112, 3), dtype=torch.uint8)
    decode_into(raw.numpy(), jpegs)
    batch = device_input(raw, flips, torch.device("cpu"), channels_last=channels_last)
    reference = np.stack([decode_face(j, bool(f)) for j, f in zip(jpegs, flips)])
    assert batch.shape == (5, 3, 112, 112) and batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    np.testing.assert_allclose(batch.numpy(), reference, atol=1e-6)
    assert batch.min() >= -1 and batch.max() <= 1
    unflipped = device_input(raw, None, torch.device("cpu"), torch.float64)  # the dtype of a float64 model
    assert unflipped.dtype == torch.float64
    np.testing.assert_allclose(unflipped[1].numpy(), decode_face(jpegs[1], False), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_prepared_batch_equals_the_per_face_reference(dtype):
    jpegs = _jpegs(6, seed=1)
    flips = np.array([True, False, False, True, True, False])
    out = torch.empty((6, 3, 112, 112), dtype=dtype)
    decode_normalised_into(out, jpegs, flips)
    reference = np.stack([decode_face(j, bool(f)) for j, f in zip(jpegs, flips)])
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-6)


def test_a_face_of_the_wrong_size_is_a_clear_error():
    out = np.empty((2, 112, 112, 3), np.uint8)
    with pytest.raises(ValueError, match="a 96x96 image"):
        decode_into(out, _jpegs(1) + _jpegs(1, size=96))
    with pytest.raises(ValueError, match="undecodable"):
        decode_into(out[:1], [b"not a jpeg"])
    with pytest.raises(ValueError, match="a 96x96 image"):
        decode_normalised_into(torch.empty((1, 3, 112, 112)), _jpegs(1, size=96), np.zeros(1, bool))


def test_flip_mask_is_a_fair_deterministic_coin():
    ids = np.arange(20_000)
    a = flip_mask(0, 3, ids)
    assert np.array_equal(a, flip_mask(0, 3, ids))  # same (seed, epoch, sample): same flip, on any worker
    assert np.array_equal(a[5000:6000], flip_mask(0, 3, ids[5000:6000]))
    assert 0.48 < a.mean() < 0.52
    assert 0.45 < (a != flip_mask(0, 4, ids)).mean() < 0.55  # a new epoch, new flips
    assert 0.45 < (a != flip_mask(1, 3, ids)).mean() < 0.55
