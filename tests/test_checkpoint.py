"""The checkpoint format (pipelines/training/checkpoint.py): round trip, re-slicing onto
another worker count, the stage-2 view of all centres, local and S3."""

import json

import boto3
import numpy as np
import pytest
import torch

from arcface_core.classifier import class_ranges
from pipelines.training import checkpoint


def _write(folder, num_classes: int, world: int, k: int, dim: int = 8, seed: int = 0):
    """A checkpoint as `world` ranks write it; returns the full centres and momentum."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes * k, dim, generator=g)
    momentum = torch.randn(num_classes * k, dim, generator=g)
    for start, end in class_ranges(num_classes, world):
        checkpoint.write_centres(str(folder), start, end, weight[start * k:end * k],
                                 {"momentum_buffer": momentum[start * k:end * k], "step": torch.tensor(7.0)})
    backbone = {"conv.weight": torch.randn(4, 3, generator=g)}
    checkpoint.write_backbone(str(folder), backbone, {"state": {}, "param_groups": []}, {"scale": 1.0})
    checkpoint.write_state(str(folder), {"step": 12, "world": world, "config": {"subcentres": k}})
    return weight, momentum, backbone


@pytest.mark.parametrize("before, after, k", [(2, 3, 1), (3, 2, 3), (1, 4, 2)])
def test_resliced_onto_another_worker_count(tmp_path, before, after, k):
    weight, momentum, _ = _write(tmp_path, num_classes=11, world=before, k=k)
    assert len(checkpoint.centre_files(str(tmp_path))) == before
    parts = []
    for start, end in class_ranges(11, after):
        w, buffers, step = checkpoint.read_centres(str(tmp_path), start, end, k)
        assert w.shape == ((end - start) * k, 8)
        torch.testing.assert_close(buffers["momentum_buffer"], momentum[start * k:end * k])
        assert float(step) == 7.0
        parts.append(w)
    torch.testing.assert_close(torch.cat(parts), weight)


def test_round_trip_and_all_centres(tmp_path):
    weight, _, backbone = _write(tmp_path, num_classes=5, world=2, k=3)
    assert checkpoint.is_checkpoint(str(tmp_path)) and not checkpoint.is_checkpoint(str(tmp_path / "nope"))
    assert checkpoint.read_state(str(tmp_path))["step"] == 12
    torch.testing.assert_close(checkpoint.read_backbone(str(tmp_path))["backbone"]["conv.weight"],
                               backbone["conv.weight"])
    centres = checkpoint.read_all_centres(str(tmp_path))
    assert centres.shape == (5, 3, 8)
    np.testing.assert_allclose(centres.reshape(15, 8), weight.numpy())
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        checkpoint.read_state(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no centre files cover"):
        checkpoint.read_centres(str(tmp_path), 5, 9, 3)


def test_files_that_are_not_ours_are_ignored_and_nothing_is_unpickled(tmp_path):
    _write(tmp_path, num_classes=4, world=2, k=1)
    (tmp_path / "centres-notes.pt").write_bytes(b"junk")  # does not match the naming: ignored
    assert len(checkpoint.centre_files(str(tmp_path))) == 2

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"backbone": Evil()}, tmp_path / checkpoint.BACKBONE)
    with pytest.raises(Exception, match="weights_only|Unsupported|global"):
        checkpoint.read_backbone(str(tmp_path))


def test_read_from_s3(tmp_path, s3_bucket, s3_endpoint):
    weight, _, _ = _write(tmp_path, num_classes=6, world=3, k=1)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for f in tmp_path.iterdir():
        client.upload_file(str(f), s3_bucket, f"ckpt/{f.name}")
    uri = f"s3://{s3_bucket}/ckpt"
    assert checkpoint.is_checkpoint(uri)
    assert json.loads(json.dumps(checkpoint.read_state(uri)))["world"] == 3
    w, _, _ = checkpoint.read_centres(uri, 0, 6, 1)
    torch.testing.assert_close(w, weight)


def test_resume_latest_takes_the_newest_complete_checkpoint(tmp_path):
    """`--resume latest`: by the step each state records; a checkpoint missing a centre file
    (a crash while writing) or its backbone is passed over; no checkpoint at all is one line."""
    import json

    import pytest as _pytest

    from pipelines.training.checkpoint import BACKBONE, centres_name, latest_checkpoint

    run = tmp_path / "runs" / "r"

    def write(name, step, centres=((0, 5), (5, 10)), backbone=True):
        folder = run / name
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"step": step, "num_classes": 10}))
        if backbone:
            (folder / BACKBONE).write_bytes(b"x")
        for start, end in centres:
            (folder / centres_name(start, end)).write_bytes(b"x")
        return str(folder)

    with _pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_checkpoint(str(run))
    write("checkpoint_2026-01-01_00-00-09", 90)
    newest = write("checkpoint_2026-01-01_00-00-01", 100)  # older name, later step
    write("checkpoint_2026-01-01_00-00-11", 110, centres=((0, 5),))  # half its centres
    write("checkpoint_2026-01-01_00-00-12", 120, backbone=False)
    assert latest_checkpoint(str(run)) == newest
