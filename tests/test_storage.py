import boto3
import pyarrow as pa
import pyarrow.parquet as pq

from dataset import storage


def test_local_roundtrip_is_atomic_and_listed(tmp_path):
    target = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(target, b"hello")
    assert storage.read_bytes(target) == b"hello"
    assert storage.exists(target) and not storage.exists(str(tmp_path / "missing"))
    assert storage.list_files(str(tmp_path)) == [target]  # no temp file left behind


def test_s3_roundtrip_through_local_endpoint(s3_bucket, s3_endpoint):
    base = f"s3://{s3_bucket}/run1"
    storage.write_bytes(storage.join(base, "x", "blob.bin"), b"\x00\x01payload")
    assert storage.exists(f"{base}/x/blob.bin")
    assert storage.read_bytes(f"{base}/x/blob.bin") == b"\x00\x01payload"
    assert storage.list_files(base, suffix=".bin") == [f"{base}/x/blob.bin"]
    # The object is really in the endpoint: boto3 (another client) sees the same bytes.
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert client.get_object(Bucket=s3_bucket, Key="run1/x/blob.bin")["Body"].read() == b"\x00\x01payload"
    assert storage.s3_client().head_object(Bucket=s3_bucket, Key="run1/x/blob.bin")["ContentLength"] == 9


def test_parquet_through_resolved_filesystem(s3_bucket):
    fs, path = storage.resolve(f"s3://{s3_bucket}/t/part-00000.parquet")
    table = pa.table({"label": pa.array([1, 2, 3], pa.int32()), "image": [b"a", b"bb", b"ccc"]})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_copy_tree_to_s3_and_back_into_new_folders(tmp_path, s3_bucket):
    """`arcface copy`: a folder up to S3 and back into folders that do not exist yet."""
    from dataset import storage

    src = tmp_path / "raw"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "x.jpg").write_bytes(b"x" * 10)
    (src / "top.csv").write_text("id\n")
    assert storage.copy_tree(str(src), f"s3://{s3_bucket}/raw") == 2
    back = tmp_path / "new" / "deeper"
    assert storage.copy_tree(f"s3://{s3_bucket}/raw", str(back)) == 2
    assert (back / "a" / "b" / "x.jpg").read_bytes() == b"x" * 10
    assert storage.copy_tree(f"s3://{s3_bucket}/raw/top.csv", str(tmp_path / "one" / "top.csv")) == 1
    assert (tmp_path / "one" / "top.csv").read_text() == "id\n"
