"""Derive a refined dataset from another: drop rows with a reason, relabel the rest.

Stage 2 (de-noising) and `arcface holdout` both end here. The caller decides, per shard,
each row's new label (or -1 with a reason to drop it); this module writes the new shards,
the new rejects (stage named), copies the parent's rejects so the folder stands alone, and
writes a manifest whose counts still add up: kept + rejected = read, over every stage.
Shards are rewritten in parallel threads (Parquet I/O and zstd release the GIL).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dataset import shards, storage
from dataset.refined import RefinedDataset

log = logging.getLogger(__name__)


@dataclass
class ShardDecision:
    """For each row of one shard: its new label, or -1 and why it is dropped."""

    labels: np.ndarray  # int32, -1 = dropped
    reasons: list[str | None]
    details: list[str] | None = None


Decide = Callable[[str, pa.Table], ShardDecision]


def _rejects_table(table: pa.Table, dropped: np.ndarray, reasons: list, details: list, stage: str) -> pa.Table:
    """Rejects rows; a reason "step/why" fills the stage column with the step, as stage 1 does."""
    rows = table.take(pa.array(dropped))
    split = [reasons[i].split("/", 1) if "/" in reasons[i] else (stage, reasons[i]) for i in dropped]
    return pa.table({
        "key": rows.column("key"), "identity": rows.column("identity"), "source": rows.column("source"),
        "stage": pa.array([s for s, _ in split], pa.string()),
        "reason": pa.array([r for _, r in split], pa.string()),
        "detail": pa.array([details[i] if details else "" for i in dropped], pa.string()),
        "image": rows.column("image"), "det_score": rows.column("det_score"),
        "eye_distance": rows.column("eye_distance"), "blur": rows.column("blur"),
    }, schema=shards.REJECT_SCHEMA)


def _rewrite_shard(src_uri: str, dst: RefinedDataset, decide: Decide, stage: str, row_group_rows: int) -> dict:
    name = storage.name(src_uri)
    table = shards.read_table(src_uri)
    d = decide(name, table)
    labels = np.asarray(d.labels, np.int32)
    if len(labels) != table.num_rows or len(d.reasons) != table.num_rows:
        raise ValueError(f"{name}: decision covers {len(labels)} rows of {table.num_rows}")
    kept = np.flatnonzero(labels >= 0)
    dropped = np.flatnonzero(labels < 0)
    missing = [i for i in dropped if not d.reasons[i]]
    if missing:
        raise ValueError(f"{name}: {len(missing)} rows dropped without a reason")
    if len(kept):  # a shard left empty is not written (and not listed in the manifest)
        out = table.take(pa.array(kept)).set_column(table.schema.get_field_index("label"), "label",
                                                    pa.array(labels[kept], pa.int32()))
        shards.write_table(dst.shard(name), out.cast(shards.SHARD_SCHEMA), row_group_rows)
    stem = name[: -len(".parquet")]
    if len(dropped):
        shards.write_table(dst.reject(f"{stage}-{stem}.parquet"),
                           _rejects_table(table, dropped, d.reasons, d.details, stage), row_group_rows)
    return {"shard": name, "read": table.num_rows, "kept": len(kept),
            "reasons": Counter(d.reasons[i] for i in dropped)}


def rewrite_dataset(src: RefinedDataset, dst: RefinedDataset, decide: Decide, identity_to_label: dict[str, int],
                    stage: str, extra: dict | None = None, row_group_rows: int = 1000, threads: int = 4,
                    before_manifest: Callable[[], None] | None = None) -> RefinedDataset:
    """Write the derived dataset `dst` and return it, opened. The manifest is written last
    (after `before_manifest`, for files the caller adds), so its presence means the dataset
    is complete."""
    started = time.perf_counter()
    parent = src.manifest.to_dict()
    if src.uri == dst.uri:
        raise ValueError("a derived dataset needs its own folder (the parent stays as it is)")
    labels_used = sorted(set(identity_to_label.values()))
    if labels_used != list(range(len(labels_used))):
        raise ValueError("labels must be contiguous 0..C-1")
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda u: _rewrite_shard(u, dst, decide, stage, row_group_rows),
                                src.shard_uris()))
    # The parent's rejects come along, so this folder accounts for every input on its own.
    for uri in src.reject_uris():
        storage.write_bytes(dst.reject(storage.name(uri)), storage.read_bytes(uri))

    read = sum(r["read"] for r in results)
    kept = sum(r["kept"] for r in results)
    if read != parent["counts"]["kept"]:
        raise RuntimeError(f"accounting broke: read {read} rows from shards listing {parent['counts']['kept']}")
    reasons: Counter = Counter()
    for r in results:
        reasons.update(r["reasons"])
    stage_rejected = read - kept
    counts = parent["counts"]
    by_reason = Counter(counts["by_reason"])
    by_reason.update(reasons)
    new_counts = {
        "read": counts["read"], "kept": kept, "rejected": counts["rejected"] + stage_rejected,
        "by_reason": dict(by_reason.most_common()),
        "by_step": counts.get("by_step", {}),
        "by_stage": {**counts.get("by_stage", {parent.get("stage", "stage1"): {
            "read": counts["read"], "kept": counts["kept"], "rejected": counts["rejected"]}}),
            stage: {"read": read, "kept": kept, "rejected": stage_rejected, "by_reason": dict(reasons.most_common())}},
    }
    if new_counts["read"] != new_counts["kept"] + new_counts["rejected"]:
        raise RuntimeError(f"accounting broke: {new_counts}")
    written = [r["shard"] for r in results if r["kept"]]
    shard_list = [dst.shard(name) for name in written]
    manifest = {
        **{k: v for k, v in parent.items() if k not in ("counts", "content_hash", "seconds", "identity_to_label")},
        "counts": new_counts,
        "num_classes": len(labels_used),
        "num_images": kept,
        "identity_to_label": identity_to_label,
        "shards": written,
        "content_hash": shards.content_hash(shard_list),
        "parent": {"uri": src.uri, "content_hash": parent["content_hash"], "stage": parent.get("stage", "stage1")},
        "stage": stage,
        "seconds": round(time.perf_counter() - started, 1),
        **(extra or {}),
    }
    if before_manifest:
        before_manifest()
    dst.write_manifest(manifest)
    return dst
