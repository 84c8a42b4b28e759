"""The refined dataset: the one thing every job produces or reads, and the only module that
knows its layout.

    ROOT/                            a local folder (absolute) or an s3:// prefix
      manifest.json                  written last: its presence means the dataset is complete
      shards/part-NNNNN.parquet      kept faces (aligned 112x112 JPEG, label, provenance)
      rejects/*.parquet              every dropped record with stage, reason and detail
      staging/part-NNNNN.{parquet,json}  stage 1's per-partition results before labels exist
      eval/*.bin, eval/*_faces.parquet   evaluation sets that come with the data
      embeddings/<model tag>/part-NNNNN.parquet  a model's embeddings, row-aligned with shards
      report/index.html              the human-readable report (PNGs beside it)

Jobs pass `RefinedDataset` objects, not path strings: `RefinedDataset.open(uri)` reads and
checks the manifest once (one clear error for a missing, unfinished or foreign folder);
`RefinedDataset.create(uri)` is the same folder being written. The manifest is typed
(`Manifest`): the fields every reader relies on are checked, the rest rides along in `extra`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field

from dataset import shards, storage

SCHEMA_VERSION = shards.SCHEMA_VERSION
MANIFEST = "manifest.json"
# A per-partition file (shards/, rejects/, staging/), possibly a write cut short (.tmp-PID).
_PART_FILE = re.compile(r"part-\d{5,}\.(parquet|json)(\.tmp-[0-9a-f]+)?")
SHARDS, REJECTS, STAGING, EVAL, EMBEDDINGS, REPORT = "shards", "rejects", "staging", "eval", "embeddings", "report"
# Evaluation sets are recognised by name: insightface pair sets and 1:N identification sets.
PAIRS_SUFFIX, FACES_SUFFIX = ".bin", "_faces.parquet"
# Raw layouts that ship their evaluation sets in the data folder itself: insightface's
# training folders (faces_emore/ holds lfw.bin, cfp_fp.bin, agedb_30.bin beside train.rec).
SETS_BESIDE_DATA = ("insightface-rec",)


class DatasetError(ValueError):
    """A location that is not a (finished, readable) refined dataset of this schema."""


@dataclass
class Manifest:
    schema_version: int
    stage: str
    source: dict  # {"format", "uri"} of the raw input
    counts: dict  # read, kept, rejected, by_reason, by_step, by_stage
    num_classes: int
    num_images: int
    identity_to_label: dict[str, int]
    shards: list[str]  # file names under shards/, in order
    content_hash: str
    parent: dict | None = None  # {"uri", "content_hash", "stage"} of the dataset this derives from
    extra: dict = field(default_factory=dict)  # stage-specific sections (clean_config, stage2, holdout...)

    REQUIRED = ("schema_version", "counts", "num_classes", "num_images", "identity_to_label", "shards",
                "content_hash")

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Manifest":
        if not isinstance(data, dict):
            raise DatasetError(f"{where}: {MANIFEST} is not a JSON object")
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise DatasetError(f"{where}: {MANIFEST} lacks {', '.join(missing)} (not a refined dataset of ours)")
        if data["schema_version"] != SCHEMA_VERSION:
            raise DatasetError(f"{where}: schema version {data['schema_version']}, this code reads {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: data[k] for k in names if k in data}
        known.setdefault("stage", "stage1")
        known.setdefault("source", {})
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if out["parent"] is None:
            del out["parent"]
        return {**out, **self.extra}

    def summary(self) -> dict:
        """Everything but the per-identity map (for trackers and logs)."""
        return {k: v for k, v in self.to_dict().items() if k != "identity_to_label"}

    @property
    def accounted(self) -> bool:
        c = self.counts
        return c["read"] == c["kept"] + c["rejected"]


class RefinedDataset:
    """A refined dataset at one location. Paths inside it come from here and nowhere else."""

    def __init__(self, uri: str, manifest: Manifest | None = None):
        self.uri = storage.absolute(uri)
        self._manifest = manifest

    def __repr__(self) -> str:
        return f"RefinedDataset({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def open(cls, uri: str) -> "RefinedDataset":
        """A finished dataset; its manifest read and checked now."""
        ds = cls(uri)
        ds._manifest = ds._read_manifest()
        return ds

    @classmethod
    def create(cls, uri: str) -> "RefinedDataset":
        """A dataset about to be written (or resumed): layout only, no manifest yet."""
        return cls(uri)

    # -- the manifest ------------------------------------------------------------------
    @property
    def manifest_uri(self) -> str:
        return storage.join(self.uri, MANIFEST)

    def is_complete(self) -> bool:
        return storage.exists(self.manifest_uri)

    def _read_manifest(self) -> Manifest:
        if not storage.exists(self.manifest_uri):
            raise DatasetError(f"{self.uri}: no {MANIFEST} (not a refined dataset, or its job has not finished)")
        try:
            data = shards.read_json(self.manifest_uri)
        except ValueError as exc:
            raise DatasetError(f"{self.manifest_uri}: not readable JSON ({exc})") from None
        return Manifest.from_dict(data, self.uri)

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = self._read_manifest()
        return self._manifest

    def write_manifest(self, manifest: Manifest | dict) -> Manifest:
        """Written last by every job: from now on the dataset is complete."""
        if isinstance(manifest, dict):
            manifest = Manifest.from_dict({"schema_version": SCHEMA_VERSION, **manifest}, self.uri)
        shards.write_json(self.manifest_uri, manifest.to_dict())
        self._manifest = manifest
        return manifest

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def content_hash(self) -> str:
        return self.manifest.content_hash

    def parent(self) -> "RefinedDataset | None":
        p = self.manifest.parent
        return RefinedDataset.open(p["uri"]) if p and p.get("uri") else None

    # -- shards, rejects, staging --------------------------------------------------------
    def shard(self, name: str) -> str:
        return storage.join(self.uri, SHARDS, name)

    def shard_uris(self) -> list[str]:
        """The shards the manifest lists, in order."""
        return [self.shard(n) for n in self.manifest.shards]

    def reject(self, name: str) -> str:
        return storage.join(self.uri, REJECTS, name)

    def reject_uris(self) -> list[str]:
        return storage.list_files(storage.join(self.uri, REJECTS), suffix=".parquet")

    def partition_files(self) -> list[str]:
        """Every per-partition file: shards, rejects and staging (named part-NNNNN.*)."""
        files = []
        for folder in (SHARDS, REJECTS, STAGING):
            try:
                files += storage.list_files(storage.join(self.uri, folder), recursive=False)
            except (FileNotFoundError, OSError):
                continue
        return files

    def holds_anything(self) -> bool:
        """Whether the location has any file at all (a dataset of ours or not)."""
        try:
            return bool(storage.list_files(self.uri))
        except (FileNotFoundError, OSError):
            return False

    def foreign_files(self) -> list[str]:
        """Files at this location that are not ours: outside the dataset layout (manifest,
        shards/, rejects/, staging/, eval/, embeddings/, report/), per-partition files not
        named part-NNNNN.*, and, once a manifest is there, shards it does not list. A manifest
        that is not one of ours makes every file foreign. What a job must not delete or
        overwrite without being told to (--overwrite)."""
        try:
            files = storage.list_files(self.uri)
        except (FileNotFoundError, OSError):
            return []
        listed: set[str] | None = None
        if self.is_complete():
            try:
                listed = set(self._read_manifest().shards)
            except ValueError:  # someone else's manifest.json: nothing here is known to be ours
                return files
        root = self.uri.rstrip("/") + "/"
        foreign = []
        for uri in files:
            parts = uri[len(root):].split("/") if uri.startswith(root) else [""]
            top, name = parts[0], parts[-1]
            if parts == [MANIFEST] or top in (EVAL, EMBEDDINGS, REPORT) and len(parts) > 1:
                continue
            if top in (SHARDS, REJECTS, STAGING) and len(parts) == 2 and _PART_FILE.fullmatch(name):
                if not (top == SHARDS and listed is not None and name not in listed):
                    continue
            foreign.append(uri)
        return foreign

    def staging(self, name: str) -> str:
        return storage.join(self.uri, STAGING, name)

    # -- embeddings ----------------------------------------------------------------------
    @staticmethod
    def model_tag(model_uri: str) -> str:
        """Embeddings of different models never mix: their folder is named by the model URI's hash."""
        return hashlib.sha256(model_uri.encode()).hexdigest()[:12]

    def embeddings(self, model_uri: str) -> str:
        return storage.join(self.uri, EMBEDDINGS, self.model_tag(model_uri))

    def embedding_shard(self, model_uri: str, shard_name: str) -> str:
        return storage.join(self.embeddings(model_uri), shard_name)

    # -- report ----------------------------------------------------------------------------
    @property
    def report_folder(self) -> str:
        return storage.join(self.uri, REPORT)

    def report_file(self, name: str) -> str:
        return storage.join(self.report_folder, name)

    @property
    def report_index(self) -> str:
        return self.report_file("index.html")

    # -- evaluation sets -----------------------------------------------------------------------
    def eval_file(self, name: str) -> str:
        """Where this dataset keeps an evaluation set of its own (`arcface holdout` writes them)."""
        return storage.join(self.uri, EVAL, name)

    def eval_sets(self) -> tuple[list[str], list[str]]:
        """(pair sets, identification sets) that come with this dataset: its own eval/, its
        parent's, the raw source's eval/ and the one beside the source (the demo's), and the
        sets stage 1 found in the source's own folder (`describe_source`: insightface's)."""
        folders = [storage.join(self.uri, EVAL)]
        parent = self.manifest.parent
        if parent and parent.get("uri"):
            folders.append(storage.join(parent["uri"], EVAL))
        source = str(self.manifest.source.get("uri", "")).rstrip("/")
        if source:
            folders += [storage.join(source, EVAL), storage.join(source.rsplit("/", 1)[0], EVAL)]
        files = []
        for folder in folders:
            try:
                files += storage.list_files(folder, recursive=False)
            except (OSError, FileNotFoundError):
                continue
        # Derived datasets carry their parent's source section, so every stage sees these. A
        # recorded set that has gone is not skipped: its reader names the missing file.
        files += list(self.manifest.source.get("eval_sets", []))
        seen: set[str] = set()
        unique = []
        for f in files:  # the same file reached twice (a parent's copy) counts once
            if storage.name(f) not in seen:
                seen.add(storage.name(f))
                unique.append(f)
        return [u for u in unique if u.endswith(PAIRS_SUFFIX)], [u for u in unique if u.endswith(FACES_SUFFIX)]


def real_location(uri: str) -> str:
    """`uri` with its links resolved (local paths) and no trailing slash: where it really is."""
    uri = storage.absolute(uri)
    return uri.rstrip("/") if storage.is_s3(uri) else os.path.realpath(uri)


def locations_overlap(a: str, b: str) -> bool:
    """Whether one location is, or lies inside, the other, links resolved."""
    a, b = real_location(a) + "/", real_location(b) + "/"
    return a.startswith(b) or b.startswith(a)


def describe_source(fmt: str, uri: str) -> dict:
    """The manifest's `source` section for raw data of format `fmt` at `uri`: where it is and,
    for a layout that ships evaluation sets beside its data (insightface's `.bin` files beside
    train.rec), those sets' URIs, so that every dataset derived from it finds them."""
    uri = storage.absolute(uri)
    source: dict = {"format": fmt, "uri": uri}
    if fmt in SETS_BESIDE_DATA:
        try:
            found = storage.list_files(uri, suffix=PAIRS_SUFFIX, recursive=False)
        except (OSError, FileNotFoundError):
            found = []
        if found:
            source["eval_sets"] = sorted(found)
    return source


def split_eval_sets(uris: list[str]) -> tuple[list[str], list[str]]:
    """Evaluation set files a user named, by kind: (pair sets, identification sets). A
    `.parquet` file is an identification set (image, identity); anything else a pair set."""
    return [u for u in uris if not u.endswith(".parquet")], [u for u in uris if u.endswith(".parquet")]


def eval_folder(root: str) -> str:
    """The eval/ folder of any dataset folder, raw ones included (the demo writes its pairs there)."""
    return storage.join(storage.absolute(root), EVAL)
