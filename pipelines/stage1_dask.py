"""`arcface stage1`: stage 1 of the refinement on Dask (the whole loop: pipelines/clean_data.py).

plan partitions (driver) -> one Dask task per partition (read, detect, align, filter,
stage) -> label identities contiguously -> final shards (Dask tasks) -> manifest + report.
A LocalCluster by default; `--scheduler ADDR` uses an existing Dask cluster, whose workers
must have this package installed. A rerun skips finished partitions; the manifest is
written last, so a dataset with a manifest is complete.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from distributed.diagnostics.plugin import WorkerPlugin

from cleaning import readers
from cleaning.readers import Partition
from cleaning.stage1 import (PartitionCounts, PartitionSettings, count_records, process_partition, reject_partition,
                             staged_uris)
from cleaning.steps import (INTERNAL_ERROR, Align, Blur, Decode, Detected, DetectionScore, ExactDuplicate, FaceSize,
                            NearDuplicate, RecordCheck, SourceLandmarks, StepChain)
from dataset import shards, storage
from dataset.refined import RefinedDataset, describe_source, locations_overlap, real_location
from cleaning.config import CleanConfig  # noqa: F401  (the section this job reads)
from pipelines.logs import Progress

log = logging.getLogger(__name__)


def build_steps(cfg: CleanConfig) -> StepChain:
    """Stage 1's steps, in order, from the config (each step takes plain arguments)."""
    return StepChain(
        before_detection=[RecordCheck(), ExactDuplicate(), Decode(cfg.max_pixels),
                          SourceLandmarks(cfg.landmark_margin)],
        after_detection=[Detected(), DetectionScore(cfg.min_det_score), FaceSize(cfg.min_eye_distance_px),
                         Align(), Blur(cfg.min_blur),
                         NearDuplicate(cfg.near_duplicate_bits, cfg.near_duplicate_correlation,
                                       aligned_max_bits=cfg.near_duplicate_aligned_bits,
                                       aligned_min_correlation=cfg.near_duplicate_aligned_correlation)],
    )


def partition_settings(cfg: CleanConfig) -> PartitionSettings:
    return PartitionSettings(clean=cfg, config_digest=config_digest(cfg))


def config_digest(cfg: CleanConfig) -> str:
    """The stage-1 config and the code version: a partition made under others is redone."""
    from pipelines.version import code_version

    # How it runs (workers, their memory) does not change what a partition holds.
    how = ("workers", "memory_limit", "stall_seconds")
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in how}
    blob = json.dumps({"clean": recipe, "code": code_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _OneTorchThread(WorkerPlugin):
    """A Dask worker plugin: one task per worker thread, so torch must not oversubscribe. A
    plugin (not a one-off client.run) so that workers restarted after a death get it too."""

    name = "arcface-one-torch-thread"

    def setup(self, worker):
        import torch

        torch.set_num_threads(1)


def finalize_partition(out: RefinedDataset, index: int, labels: dict[str, int], row_group_rows: int) -> str:
    """Staged kept rows + the global identity->label map -> the final shard."""
    uri = out.shard(f"{shards.part_name(index)}.parquet")
    staged = shards.read_table(staged_uris(out, index)["kept"])
    ids = staged.column("identity").to_pylist()
    label = pa.array([labels[i] for i in ids], pa.int32())
    table = staged.add_column(1, "label", label).select(shards.SHARD_SCHEMA.names).cast(shards.SHARD_SCHEMA)
    shards.write_table(uri, table, row_group_rows)
    return uri


class _EnvironmentKept:
    """Restores os.environ on exit. Dask's nanny writes its workers' settings into the
    parent's environment (MALLOC_TRIM_THRESHOLD_=65536, OMP_NUM_THREADS=1, ...); left there,
    every process started later inherits them - Ray Train workers of `arcface clean-data` then
    spent most of their time in the kernel trimming memory (2.7x slower steps, measured)."""

    def __enter__(self):
        self.saved = dict(os.environ)

    def __exit__(self, *exc):
        os.environ.clear()
        os.environ.update(self.saved)


def _client(scheduler: str | None, cfg: CleanConfig):
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    import dask

    # A task whose worker dies is failed after one more try (Dask's default is three): a
    # failed partition is split and retried by _bisect, so each death isolates the record faster.
    # Spilling and pausing are off: a task's memory is its own working set, never stored results
    # that could be spilled, so a worker paused above 80% (memory freed by a finished task but
    # kept by the allocator) would wait forever for memory that never comes back. That hung a
    # CI run for 10 minutes; without the pause the worker either finishes or is restarted at 95%.
    # A worker is sent only the tasks it can run now (saturation 1.0): a task queued behind a
    # poison record on the same worker would otherwise be blamed for its deaths too.
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "distributed.scheduler.worker-saturation": 1.0,
                          "distributed.worker.memory.target": False,
                          "distributed.worker.memory.spill": False,
                          "distributed.worker.memory.pause": False}):
        # The nanny keeps a shallow copy of the config, whose nested settings the end of this
        # `with` puts back in place: a worker it restarted (after a death, or at a stall) would
        # start with pausing on again, pause on its baseline memory and never run another task
        # (a CI run rejected good records as stalled that way). A deep copy outlives the block.
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, host="127.0.0.1", memory_limit=cfg.memory_limit,
                               config=copy.deepcopy(dask.config.config))
    return Client(cluster), cluster


class PartitionStalled(RuntimeError):
    """No partition finished within clean.stall_seconds while this one was in progress."""


_FAILURE_DETAIL = {"worker_lost": "the worker processing this record died or failed",
                   "stalled": "the worker processing this record made no progress"}


def halves(part: Partition, records: int | None, next_index: int) -> list[Partition]:
    """A failed partition's two halves (new indices from `next_index`), to run again; or,
    when it holds a single record, that record's partition alone (to reject)."""
    lo, hi = part.subset or (0, records)  # records: counted, for a partition not yet split
    if hi - lo <= 1:
        return [dataclasses.replace(part, subset=(lo, hi), index=next_index)]
    mid = (lo + hi) // 2
    return [dataclasses.replace(part, subset=(lo, mid), index=next_index),
            dataclasses.replace(part, subset=(mid, hi), index=next_index + 1)]


# How many times a run replaces workers whose nannies gave up before it takes the cluster
# for broken (a worker that cannot start at all would otherwise be replaced forever).
MAX_WORKER_REPLACEMENTS = 3


def _replace_lost_workers(client, cluster, wanted: int, timeout: float) -> int:
    """Our LocalCluster with no worker left: its nannies that gave up are replaced by new ones,
    and the scheduler waited on until `wanted` workers are back. A nanny does not restart a
    worker that dies while the nanny is still starting or restarting it (distributed's
    Nanny._on_worker_exit); a CI run lost its only worker that way and failed the job on one
    poison record. Returns how many were replaced; raises RuntimeError when they do not start."""
    alive = set(client.run_on_scheduler(lambda dask_scheduler: [w.name for w in dask_scheduler.workers.values()]))
    gone = [name for name in list(cluster.worker_spec) if name not in alive]
    # New names first (a gone one's name, reused, would read as a worker still in place), then
    # the gone ones out of the spec: scale's correction closes their nannies and starts the new.
    for _ in gone:
        cluster.worker_spec.update(cluster.new_worker_spec())
    for name in gone:
        del cluster.worker_spec[name]
    cluster.scale(wanted)
    try:
        client.wait_for_workers(wanted, timeout=timeout)
    except TimeoutError as exc:
        raise RuntimeError(f"stage 1: the Dask workers did not start again within {timeout:.0f} s") from exc
    return len(gone)


def _running_tasks(dask_scheduler) -> tuple[dict, dict, list]:
    """On the scheduler: per worker, the keys it reports executing (in its heartbeats, which a
    thread stuck in a task does not stop) and the keys assigned to it (which may be queued);
    and the workers paused for memory (they start no task)."""
    from distributed.core import Status

    workers = dask_scheduler.workers.values()
    return ({w.address: [str(t.key) for t in w.executing] for w in workers},
            {w.address: [str(t.key) for t in w.processing] for w in workers},
            [w.address for w in workers if w.status == Status.paused])


@dataclass
class StallPlan:
    split: list  # keys whose partitions are split (or, down to one record, rejected as stalled)
    again: list  # keys whose partitions are submitted again whole, under new keys
    suspects: list  # keys taken as stuck (their workers are restarted)
    counted: dict = dataclasses.field(default_factory=dict)  # key -> records, counted here


def plan_after_stall(pending: dict, executing: dict, assigned: dict, strikes: dict, count=None) -> StallPlan:
    """What to do with the pending partitions (key -> record count, None when not yet
    counted) when none finished for clean.stall_seconds.

    The suspects are the partitions the workers report executing (else those assigned to
    them); when Dask no longer has any of ours running (it can lose a task with its worker,
    dask/distributed#4001) the culprit is unknown and every pending partition is a suspect.
    Suspects are split; one down to a single record gets a second chance (`strikes`, updated
    here) before it is rejected, so a good record on a slow, freshly restarted worker is not
    taken for a stuck one. Suspects not yet counted are counted first (`count(key)`;
    splitting counts them anyway); the others go again whole. Each stall splits or strikes
    every suspect, so a job cannot stall forever."""
    suspects = []
    for running in (executing, assigned):
        suspects = [k for keys in running.values() for k in keys if k in pending]
        if suspects:
            break
    else:
        suspects = list(pending)
    counted = {k: count(k) for k in suspects if pending[k] is None and count is not None}
    split, again = [], []
    for key in pending:
        records = counted.get(key, pending[key])
        if key in suspects and not (records == 1 and strikes.get(key, 0) == 0):
            split.append(key)
        else:
            again.append(key)
            if key in suspects:
                strikes[key] = strikes.get(key, 0) + 1
    return StallPlan(split=split, again=again, suspects=suspects, counted=counted)


class Stage1Schedule:
    """Runs stage 1's partitions on a Dask client until every record is in a staged table:
    one method per event (a partition finished, failed, stalled; the workers were lost).

    A partition whose worker dies (memory, a crashing decoder) or stalls is split in halves
    and run again, until the record to blame is alone and rejected as `resource/<reason>`;
    one poison record costs itself. Futures are polled rather than waited on: a task Dask
    lost with a dead worker (dask/distributed#4001) would otherwise leave the driver
    waiting forever."""

    def __init__(self, client, cluster, out: RefinedDataset, cfg: CleanConfig):
        self.client, self.cluster, self.out, self.cfg = client, cluster, out, cfg
        self.steps, self.settings = build_steps(cfg), partition_settings(cfg)
        self.run_id = id(self)  # task keys of this run
        self.running: dict = {}  # future -> its partition
        self.finished: list[tuple[Partition, PartitionCounts]] = []
        self.next_index = 0  # for the partitions splitting makes
        self.strikes: dict[str, int] = {}  # key -> stalls a lone record has been pending through
        self.replaced = 0  # workers started again after their nannies gave up
        self.bar = Progress("stage 1", unit="record")

    def run(self, parts: list[Partition]) -> list[tuple[Partition, PartitionCounts]]:
        """Every partition's counts, in partition order."""
        self.next_index = max((p.index for p in parts), default=-1) + 1
        for part in parts:
            self.submit(part, retries=1)
        last_progress = time.monotonic()
        while self.running:
            done = [f for f in self.running if f.done()]
            if done:
                last_progress = time.monotonic()
                for future in done:
                    self.on_finished(future)
            elif time.monotonic() - last_progress > self.cfg.stall_seconds:
                self.on_stall()
                last_progress = time.monotonic()
            else:
                time.sleep(0.2)
        self.bar.close()
        return sorted(self.finished, key=lambda pc: pc[0].index)

    def submit(self, part: Partition, retries: int = 0):
        future = self.client.submit(process_partition, part, self.steps, self.settings, self.out,
                                    key=f"stage1-{part.index}-{self.run_id}", retries=retries, pure=False)
        self.running[future] = part
        return future

    def record(self, part: Partition, counts: PartitionCounts) -> None:
        self.finished.append((part, counts))
        self.bar.update(counts.read, partitions=f"{len(self.finished)}/{len(self.finished) + len(self.running)}",
                        kept=sum(c.kept for _, c in self.finished))

    def on_finished(self, future) -> None:
        from dask.distributed import KilledWorker

        part = self.running.pop(future)
        try:
            counts = future.result()
        except (KilledWorker, MemoryError) as exc:  # a worker died on it (memory, a crashing decoder)
            # A step that raises on a record has already rejected it (internal_error); what
            # raises out of a partition (storage, an input that cannot be listed or opened)
            # fails the job with its message: splitting would hide it.
            self.on_failed(part, exc, "worker_lost")
        else:
            self.record(part, counts)
        finally:
            future.release()

    def on_failed(self, part: Partition, error: Exception, reason_code: str) -> None:
        """Its halves run again; a single record is rejected as `resource/<reason_code>`."""
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        # Counted here, not on a cluster that has just lost a task.
        records = None if part.subset else count_records(part)
        pieces = halves(part, records, self.next_index)
        self.next_index += len(pieces)
        if len(pieces) == 2:
            log.warning("partition %s (records %d-%d) failed (%s); retrying its halves to isolate the record",
                        part.index, pieces[0].subset[0], pieces[1].subset[1], reason)
            for piece in pieces:
                self.submit(piece)
            return
        [single] = pieces
        log.error("record %d of partition %s was rejected: its worker failed on it (%s)",
                  single.subset[0], part.index, reason)
        self.record(single, reject_partition(single, self.settings, self.out, "resource", reason_code,
                                             f"{_FAILURE_DETAIL[reason_code]} ({reason})"))

    def on_stall(self) -> None:
        """No partition finished for clean.stall_seconds: see plan_after_stall."""
        executing, assigned, paused = self.client.run_on_scheduler(_running_tasks)
        log.warning("stage 1: no partition finished in %.0f s; %d workers, executing: %s, assigned: %s, "
                    "paused for memory: %s", self.cfg.stall_seconds, len(executing), executing, assigned, paused)
        if not executing:
            self.on_workers_lost()
            return
        if paused and not any(executing.values()):
            # Nothing runs because the workers are paused (a user's cluster with
            # distributed.worker.memory.pause on; ours never pauses): the records are not to
            # blame, and the job cannot go on until the cluster is given more memory.
            raise RuntimeError(f"stage 1 stalled: Dask workers {paused} are paused for memory and run no task; "
                               "give them more memory or set distributed.worker.memory.pause to False")
        by_key = {future.key: (future, part) for future, part in self.running.items()}
        pending = {k: (part.subset[1] - part.subset[0] if part.subset else None) for k, (_, part) in by_key.items()}
        plan = plan_after_stall(pending, executing, assigned, self.strikes,
                                count=lambda k: count_records(by_key[k][1]))
        for key, records in plan.counted.items():  # so that splitting does not count them again
            future, part = by_key[key]
            by_key[key] = future, dataclasses.replace(part, subset=(0, records))
        # Workers running a suspect, or still running a partition we no longer hold (a
        # cancelled task whose thread is stuck): a thread stuck in native code can only be
        # freed with its process.
        busy = [w for w in executing
                if set(executing[w] + assigned.get(w, [])) & set(plan.suspects) or set(executing[w]) - set(pending)]
        if busy:
            self.client.restart_workers(busy, timeout=120, raise_for_error=False)
        stalled = PartitionStalled(f"no partition finished in {self.cfg.stall_seconds:.0f} s")
        for key in plan.split + plan.again:
            future, part = by_key[key]
            del self.running[future]
            future.cancel()
            if key in plan.split:
                self.on_failed(part, stalled, "stalled")
            else:
                again = self.submit(dataclasses.replace(part, index=self.next_index))
                self.next_index += 1
                self.strikes[again.key] = self.strikes.pop(key, 0)

    def on_workers_lost(self) -> None:
        """The cluster has no worker. Ours gets new ones (a bounded number of times: a worker
        that cannot start at all must not be replaced forever); the pending partitions wait,
        unassigned, and no record is blamed. A user's cluster fails the job."""
        limit = MAX_WORKER_REPLACEMENTS * self.cfg.workers
        if self.cluster is None or self.replaced >= limit:
            raise RuntimeError(f"stage 1 stalled: the Dask cluster has no workers (none finished a partition "
                               f"in {self.cfg.stall_seconds:.0f} s)")
        self.replaced += max(1, _replace_lost_workers(self.client, self.cluster, self.cfg.workers,
                                                      timeout=max(120.0, self.cfg.stall_seconds)))
        log.warning("stage 1: the cluster had no worker left; %d started again (%d of at most %d so far)",
                    self.cfg.workers, self.replaced, limit)


def contiguous_labels(out: RefinedDataset, parts: list[Partition]) -> dict[str, int]:
    """Contiguous labels over the identities that kept at least one face, in sorted order."""
    kept_ids: set[str] = set()
    for part in parts:
        staged = shards.read_table(staged_uris(out, part.index)["kept"], columns=["identity"])
        kept_ids.update(pc.unique(staged.column("identity")).to_pylist())
    return {identity: n for n, identity in enumerate(sorted(kept_ids))}


def _run_on_dask(parts: list[Partition], out: RefinedDataset, cfg: CleanConfig, scheduler: str | None):
    """Stage 1 on Dask: every partition staged (Stage1Schedule), the identities labelled,
    then each partition's final shard written (Dask tasks)."""
    client, cluster = _client(scheduler, cfg)
    try:
        client.register_plugin(_OneTorchThread())
        finished = Stage1Schedule(client, cluster, out, cfg).run(parts)
        labels = contiguous_labels(out, [part for part, _ in finished])
        # One future holding the whole map (a dict passed bare would be scattered key by key).
        [label_future] = client.scatter([labels], broadcast=True)
        indices = [part.index for part, _ in finished]
        shard_uris = client.gather(client.map(finalize_partition, [out] * len(indices), indices,
                                              [label_future] * len(indices), [cfg.row_group_rows] * len(indices),
                                              pure=False))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return shard_uris, [counts for _, counts in finished], labels


class OutputRefused(ValueError):
    """An --out that the job must not write into (one line for the CLI)."""


def check_output(input_uri: str, out: RefinedDataset, overwrite: bool = False) -> None:
    """--out must not be inside --input (the next run would read the output as input) nor
    hold it, links resolved; and it must be empty or a stage-1 run of ours from this input
    with no file our layout does not know (see RefinedDataset.foreign_files), unless
    --overwrite, which names what it replaces."""
    if locations_overlap(input_uri, out.uri):
        raise OutputRefused(f"--out {out.uri} and --input {input_uri} overlap (one holds the other, links "
                            f"resolved: {real_location(out.uri)}): write the output elsewhere")
    if not out.holds_anything():
        return
    foreign = out.foreign_files()
    if overwrite:
        replaced = foreign or ([out.manifest_uri] if out.is_complete() else out.partition_files())
        if replaced:
            log.warning("--overwrite: replacing %d files at %s: %s%s", len(replaced), out.uri,
                        ", ".join(replaced[:5]), " ..." if len(replaced) > 5 else "")
        return
    if foreign:
        raise OutputRefused(f"--out {out.uri} holds {len(foreign)} files that are not a dataset of ours "
                            f"(e.g. {foreign[0]}); choose an empty folder or pass --overwrite to replace them")
    if out.is_complete():
        source = out.manifest.source.get("uri", "")
        if source and source.rstrip("/") != input_uri.rstrip("/"):
            raise OutputRefused(f"--out {out.uri} holds a dataset refined from {source}, not from {input_uri}; "
                                "choose another folder or pass --overwrite")


def _drop_stale(out: RefinedDataset, counts: list[PartitionCounts]) -> None:
    """Per-partition files of partitions this run does not have (an earlier plan's)."""
    current = {shards.part_name(c.partition) for c in counts}
    for uri in out.partition_files():
        if storage.name(uri).split(".")[0] not in current:
            storage.delete(uri)


def run_stage1(input_uri: str, fmt: str, out: RefinedDataset, cfg: CleanConfig,
                   scheduler: str | None = None, overwrite: bool = False) -> RefinedDataset:
    """Stage 1 of `input_uri` (raw, in format `fmt`) into `out`; returns it, finished."""
    started = time.perf_counter()
    input_uri = storage.absolute(input_uri)  # the manifest must lead back to the source from anywhere
    storage.check_bucket(out.uri)
    check_output(input_uri, out, overwrite)
    try:
        leftovers = [u for u in storage.list_files(out.uri) if ".tmp-" in storage.name(u)]
    except (FileNotFoundError, OSError):  # a new output folder
        leftovers = []
    for uri in leftovers:  # writes cut short by a kill: never a finished file
        storage.delete(uri)
    parts = readers.plan(fmt, input_uri, cfg.records_per_partition)
    log.info("%s: %d partitions from %s", fmt, len(parts), input_uri)
    with _EnvironmentKept():
        shard_uris, counts, labels = _run_on_dask(parts, out, cfg, scheduler)
    _check_internal_errors(counts, cfg)
    _drop_stale(out, counts)
    out.write_manifest(build_manifest(input_uri, fmt, cfg, counts, labels, shard_uris, time.perf_counter() - started))
    if not labels:
        log.warning("%s: no face was kept (every input is in rejects/ with its reason); the dataset is empty",
                    out.uri)
    try:
        from cleaning.report import write_report

        write_report(out)
    except Exception:  # the report is a view: the dataset stands without it, but no index
        # means no report (a stale one from an earlier run must not pass for this one's),
        # and the commands exit non-zero.
        log.exception("the report of %s failed", out.uri)
        storage.delete(out.report_index)
    return out


class TooManyInternalErrors(ValueError):
    """Many records were rejected because a step raised on them: a bug, not bad input (a
    ValueError for the CLI's one-line error, as OutputRefused)."""


def _check_internal_errors(counts: list[PartitionCounts], cfg: CleanConfig) -> None:
    read = sum(c.read for c in counts)
    errors = Counter({k: n for c in counts for k, n in c.reasons.items() if k.endswith(f"/{INTERNAL_ERROR}")})
    total = sum(errors.values())
    if total >= 10 and total > cfg.max_internal_error_share * read:
        raise TooManyInternalErrors(
            f"{total} of {read} records ({total / read:.1%}) were rejected because a step raised on them "
            f"({', '.join(f'{k}: {n}' for k, n in errors.most_common())}): that is a bug, not bad input. Each "
            f"record's error is in rejects/ (reason {INTERNAL_ERROR}), with its traceback in the Dask workers' "
            "log; no manifest was written. To accept them, raise clean.max_internal_error_share")


def build_manifest(input_uri, fmt, cfg: CleanConfig, counts: list[PartitionCounts], labels, shard_uris,
                   seconds) -> dict:
    read = sum(c.read for c in counts)
    kept = sum(c.kept for c in counts)
    rejected = sum(c.rejected for c in counts)
    reasons: Counter = Counter()
    steps: dict[str, dict] = {}
    for c in counts:
        reasons.update(c.reasons)
        for name, s in c.steps.items():
            agg = steps.setdefault(name, {"kept": 0, "dropped": Counter()})
            agg["kept"] += s["kept"]
            agg["dropped"].update(s["dropped"])
    if read != kept + rejected:
        raise RuntimeError(f"accounting broke: read {read} != kept {kept} + rejected {rejected}")
    return {
        "schema_version": shards.SCHEMA_VERSION,
        "source": describe_source(fmt, input_uri),  # with the evaluation sets a layout ships beside its data
        "counts": {"read": read, "kept": kept, "rejected": rejected, "by_reason": dict(reasons.most_common()),
                   "by_step": {n: {"kept": s["kept"], "dropped": dict(s["dropped"])} for n, s in steps.items()}},
        "num_classes": len(labels),
        "num_images": kept,
        "identity_to_label": labels,
        "shards": [storage.name(u) for u in sorted(shard_uris)],
        "executed_by": {str(c.partition): c.worker for c in counts},
        # The largest resident memory any worker process reached (MiB), against clean.memory_limit.
        "worker_peak_rss_mib": max((c.peak_rss_mib for c in counts), default=0),
        "clean_config": dataclasses.asdict(cfg),
        "content_hash": shards.content_hash(shard_uris),
        "seconds": round(seconds, 1),
        "stage": "stage1",
    }
