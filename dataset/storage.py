"""Open local paths and `s3://` URIs through one interface (pyarrow.fs).

S3 honours the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_DEFAULT_REGION / AWS_REGION) and a custom endpoint from
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (the same variables boto3 reads), so a MinIO or
moto endpoint is configuration only.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def absolute(uri: str | os.PathLike) -> str:
    """The one spelling of a location that means the same from any process: s3:// URIs as
    they are (without a trailing slash), local paths absolute."""
    uri = os.fspath(uri)
    if is_s3(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(uri)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict = {"region": _region()}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    # Explicit keys when given; otherwise pyarrow's default chain (profile, instance role).
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or an s3:// URI."""
    uri = os.fspath(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = os.fspath(uri)
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def check_bucket(uri: str) -> None:
    """An s3:// location's bucket must exist before any work is scheduled (a missing bucket
    would otherwise surface as a worker's traceback, once per retry)."""
    if not is_s3(uri):
        return
    bucket = uri[len("s3://"):].split("/", 1)[0]
    try:
        info = s3_filesystem().get_file_info(bucket)
    except OSError as exc:
        raise OSError(f"s3://{bucket}: not reachable ({exc}); check AWS_ENDPOINT_URL and credentials") from None
    if info.type == pafs.FileType.NotFound:
        where = f" at {s3_endpoint()}" if s3_endpoint() else ""
        raise FileNotFoundError(f"s3 bucket {bucket!r} does not exist{where}: create it (locally, "
                                "`arcface services up --s3` creates the bucket `arcface`)")


def s3_client():
    """A boto3 client configured like `s3_filesystem` (for what pyarrow.fs does not cover)."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint(), region_name=_region())


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object so that readers see either nothing or all of it.

    Local files go to a temporary name in the same folder and are renamed; an S3 PUT is
    already all-or-nothing.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def delete(uri: str) -> None:
    """Remove one file if it is there."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def name(uri: str) -> str:
    """The last component of a path or URI."""
    return os.fspath(uri).rstrip("/").rsplit("/", 1)[-1]


def list_files(uri: str, suffix: str = "", recursive: bool = True) -> list[str]:
    """Files under a folder (URIs in the same form as the input), sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    out = []
    for info in infos:
        if info.type == pafs.FileType.File and info.path.endswith(suffix):
            out.append(f"s3://{info.path}" if is_s3(uri) else info.path)
    return sorted(out)


def size(uri: str) -> int:
    fs, path = resolve(uri)
    return fs.get_file_info(path).size


def open_input(uri: str):
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def copy_tree(source: str, destination: str) -> int:
    """Copy a file or a folder's files (local or s3://, either way) to `destination`; the
    number of files copied. What users do with `aws s3 sync`, with no other tool installed."""
    src_fs, src = resolve(source)
    dst_fs, dst = resolve(destination)
    info = src_fs.get_file_info(src)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{source}: no such file or folder")
    check_bucket(destination)
    count = 1 if info.type == pafs.FileType.File else len(
        [f for f in src_fs.get_file_info(pafs.FileSelector(src, recursive=True)) if f.type == pafs.FileType.File])
    if not is_s3(destination):  # pyarrow writes into existing local folders only
        os.makedirs(dst if info.type == pafs.FileType.Directory else os.path.dirname(dst), exist_ok=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs, use_threads=True)
    return count
