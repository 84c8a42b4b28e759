"""The refined dataset object (dataset/refined.py): open and validate, every path of the
layout, evaluation sets, local and s3://."""

import json

import boto3
import pytest

from dataset import DatasetError, RefinedDataset, storage
from dataset.refined import SCHEMA_VERSION, split_eval_sets


def test_open_a_finished_dataset(demo_shards):
    ds = RefinedDataset.open(str(demo_shards) + "/")
    assert ds.uri == str(demo_shards)  # absolute, no trailing slash: one spelling
    m = ds.manifest
    assert m.schema_version == SCHEMA_VERSION and m.stage == "stage1" and m.accounted
    assert ds.num_classes == len(m.identity_to_label) and ds.content_hash == m.content_hash
    assert [storage.name(u) for u in ds.shard_uris()] == m.shards
    assert all(storage.exists(u) for u in ds.shard_uris())
    assert ds.reject_uris() and all(u.startswith(str(demo_shards / "rejects")) for u in ds.reject_uris())
    assert ds.report_index == str(demo_shards / "report" / "index.html") and storage.exists(ds.report_index)
    assert ds.parent() is None
    assert ds.embeddings("models:/a@b") != ds.embeddings("models:/a@c")
    assert ds.embedding_shard("x", m.shards[0]).startswith(ds.uri + "/embeddings/")
    assert "identity_to_label" not in m.summary()
    # The demo's evaluation sets sit beside its raw source: found through the manifest.
    pairs, faces = ds.eval_sets()
    assert [storage.name(p) for p in pairs] == ["demo_pairs.bin"]
    assert [storage.name(f) for f in faces] == ["demo_faces.parquet"]


def test_one_clear_error_for_what_is_not_a_dataset(tmp_path, demo_shards):
    with pytest.raises(DatasetError, match="no manifest.json"):
        RefinedDataset.open(tmp_path / "missing")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"name": "something else"}))
    with pytest.raises(DatasetError, match="lacks schema_version"):
        RefinedDataset.open(foreign)
    future = tmp_path / "future"
    future.mkdir()
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(DatasetError, match="schema version 99"):
        RefinedDataset.open(future)
    (future / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not readable JSON"):
        RefinedDataset.open(future)
    assert issubclass(DatasetError, ValueError)  # the CLI's one-line error


def test_manifest_round_trip_keeps_stage_sections(tmp_path, demo_shards):
    ds = RefinedDataset.open(demo_shards)
    copy = RefinedDataset.create(tmp_path / "copy")
    assert not copy.is_complete()
    written = copy.write_manifest({**ds.manifest.to_dict(), "stage2": {"model": "m"}})
    assert written.extra["stage2"] == {"model": "m"} and written.extra["clean_config"]
    again = RefinedDataset.open(tmp_path / "copy").manifest
    assert again.to_dict() == written.to_dict()


def test_on_s3(demo_shards, s3_bucket, s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for path in demo_shards.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"ds/{path.relative_to(demo_shards).as_posix()}")
    ds = RefinedDataset.open(f"s3://{s3_bucket}/ds/")
    assert ds.uri == f"s3://{s3_bucket}/ds"
    assert ds.shard_uris()[0] == f"s3://{s3_bucket}/ds/shards/{ds.manifest.shards[0]}"
    assert all(storage.exists(u) for u in ds.shard_uris())
    assert len(ds.reject_uris()) == len(list((demo_shards / "rejects").glob("*.parquet")))
    assert ds.content_hash == RefinedDataset.open(demo_shards).content_hash
    with pytest.raises(DatasetError, match="no manifest.json"):
        RefinedDataset.open(f"s3://{s3_bucket}/nothing")


def test_named_evaluation_sets_split_by_kind():
    assert split_eval_sets(["a/lfw.bin", "b/x_faces.parquet", "c/cfp.bin", "d/other.parquet"]) == (
        ["a/lfw.bin", "c/cfp.bin"], ["b/x_faces.parquet", "d/other.parquet"])
