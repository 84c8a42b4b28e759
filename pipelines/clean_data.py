"""`arcface clean-data`: stage 1 of the refinement on Dask.

plan partitions (driver) -> one Dask task per partition (read, detect, align, filter,
stage) -> label identities contiguously -> final shards (Dask tasks) -> manifest + report.
A LocalCluster by default; `--scheduler ADDR` uses an existing Dask cluster, whose workers
must have this package installed. A rerun skips finished partitions; the manifest is
written last, so a dataset with a manifest is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from cleaning import readers, shards, storage
from cleaning.stage1 import process_partition, staged_uris
from pipelines.config import Config
from pipelines.logs import progress

log = logging.getLogger(__name__)


def _worker_setup():
    import torch

    torch.set_num_threads(1)  # one task per worker thread; torch must not oversubscribe


def finalize_partition(out: str, index: int, labels: dict[str, int], row_group_rows: int) -> str:
    """Staged kept rows + the global identity->label map -> the final shard."""
    uri = storage.join(out, "shards", f"{shards.part_name(index)}.parquet")
    staged = shards.read_table(staged_uris(out, index)["kept"])
    ids = staged.column("identity").to_pylist()
    label = pa.array([labels[i] for i in ids], pa.int32())
    table = staged.add_column(1, "label", label).select(shards.SHARD_SCHEMA.names).cast(shards.SHARD_SCHEMA)
    shards.write_table(uri, table, row_group_rows)
    return uri


class _EnvironmentKept:
    """Restores os.environ on exit. Dask's nanny writes its workers' settings into the
    parent's environment (MALLOC_TRIM_THRESHOLD_=65536, OMP_NUM_THREADS=1, ...); left there,
    every process started later inherits them - Ray Train workers of `arcface refine` then
    spent most of their time in the kernel trimming memory (2.7x slower steps, measured)."""

    def __enter__(self):
        self.saved = dict(os.environ)

    def __exit__(self, *exc):
        os.environ.clear()
        os.environ.update(self.saved)


def _client(scheduler: str | None, cfg: Config):
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=cfg.clean.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, host="127.0.0.1", memory_limit=cfg.clean.memory_limit)
    return Client(cluster), cluster


def _run_on_dask(parts, out: str, cfg: Config, scheduler: str | None):
    from dask.distributed import as_completed

    client, cluster = _client(scheduler, cfg)
    try:
        client.run(_worker_setup)
        futures = [client.submit(process_partition, p, cfg.clean, out, key=f"stage1-{p.index}-{id(parts)}", retries=2,
                                 pure=False) for p in parts]
        counts = []
        for fut in progress(as_completed(futures), total=len(futures), desc="stage 1 partitions"):
            counts.append(fut.result())
            fut.release()
        counts.sort(key=lambda c: c["partition"])
        # Contiguous labels over identities that kept at least one face, in sorted order.
        kept_ids: set[str] = set()
        for p in parts:
            staged = shards.read_table(staged_uris(out, p.index)["kept"], columns=["identity"])
            kept_ids.update(pc.unique(staged.column("identity")).to_pylist())
        labels = {ident: n for n, ident in enumerate(sorted(kept_ids))}
        label_future = client.scatter(labels, broadcast=True)
        final = client.map(finalize_partition, [out] * len(parts), [p.index for p in parts],
                           [label_future] * len(parts), [cfg.clean.row_group_rows] * len(parts), pure=False)
        shard_uris = client.gather(final)
        del final, futures
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return shard_uris, counts, labels


def run_clean_data(input_uri: str, fmt: str, out: str, cfg: Config, scheduler: str | None = None) -> dict:
    started = time.perf_counter()
    if not storage.is_s3(input_uri):
        input_uri = os.path.abspath(input_uri)  # the manifest must lead back to the source from anywhere
    if not storage.is_s3(out):
        out = os.path.abspath(out)
    parts = readers.plan(fmt, input_uri, cfg.clean.records_per_partition)
    log.info("%s: %d partitions from %s", fmt, len(parts), input_uri)
    with _EnvironmentKept():
        shard_uris, counts, labels = _run_on_dask(parts, out, cfg, scheduler)
    manifest = build_manifest(input_uri, fmt, out, cfg, counts, labels, shard_uris, time.perf_counter() - started)
    shards.write_json(storage.join(out, "manifest.json"), manifest)
    try:
        from cleaning.report import write_report

        write_report(out, manifest)
    except Exception:  # the report is a view; the dataset stands without it
        log.exception("report failed")
    return manifest


def build_manifest(input_uri, fmt, out, cfg, counts, labels, shard_uris, seconds) -> dict:
    read = sum(c["read"] for c in counts)
    kept = sum(c["kept"] for c in counts)
    rejected = sum(c["rejected"] for c in counts)
    reasons: Counter = Counter()
    steps: dict[str, dict] = {}
    for c in counts:
        reasons.update(c["reasons"])
        for name, s in c["steps"].items():
            agg = steps.setdefault(name, {"kept": 0, "dropped": Counter()})
            agg["kept"] += s["kept"]
            agg["dropped"].update(s["dropped"])
    if read != kept + rejected:
        raise RuntimeError(f"accounting broke: read {read} != kept {kept} + rejected {rejected}")
    return {
        "schema_version": shards.SCHEMA_VERSION,
        "source": {"format": fmt, "uri": input_uri},
        "counts": {"read": read, "kept": kept, "rejected": rejected, "by_reason": dict(reasons.most_common()),
                   "by_step": {n: {"kept": s["kept"], "dropped": dict(s["dropped"])} for n, s in steps.items()}},
        "num_classes": len(labels),
        "num_images": kept,
        "identity_to_label": labels,
        "shards": [u.rsplit("/", 1)[-1] for u in sorted(shard_uris)],
        "executed_by": {str(c["partition"]): c.get("worker", "") for c in counts},
        "clean_config": dataclasses.asdict(cfg.clean),
        "content_hash": shards.content_hash(shard_uris),
        "seconds": round(seconds, 1),
        "stage": "stage1",
    }
