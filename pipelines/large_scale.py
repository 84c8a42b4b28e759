"""Large-scale verification and identification on Ray: MegaFace, Trillion-Pairs, MFR-ALL, YTF.

The engine. Features live in shards (`.npy` pairs `features-NNNNN.npy` + `labels-NNNNN.npy`,
or Parquet with `feature` and `label` columns; local or s3://). A `FeatureSet` cuts them
into blocks of at most `block_size` rows that never straddle a shard. Verification runs one
task per block pair (i <= j all-to-all; every pair probes x gallery): the task reads its two
blocks, scores them in tiles (`arcface_core.large_scale.reduce_verification_block`) and
returns the block's genuine scores, its impostor top-k and, for FARs whose k is too large
to keep, a 65,536-bin histogram; the driver merges as results arrive. A second pass runs
only when a FAR needs the histogram refined. Identification runs one task per (probe block,
gallery block) and merges per-probe top-k lists. Memory per task: two blocks plus one tile
of scores, whatever N is. Tasks are Ray tasks (`num_gpus=1` with `gpu=True`) when Ray is
initialised, or run in the driver (`LocalRunner`) otherwise.

The protocol adapters read each release's layout (see `load_megaface`, `load_trillion_pairs`,
`load_mfr`, `load_ytf`), embed its images with an `embed_images(uris, landmarks) -> features`
callable (`local_image_embedder` wraps any embedder; the lead's Ray embedding plugs in the
same way) into feature shards, and report figures named as the registry gates on them
(`rank1`, `tar_at_far_1e-06`, `tpir_at_fpir_0.001`, `accuracy`) with a ROC or CMC curve.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from arcface_core import large_scale as core
from arcface_core.metrics import kfold_accuracy, l2_normalize
from dataset import storage

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 32768
TOPK_LIMIT = 2_000_000  # order statistics beyond this are found by radix selection (two passes)


# -- feature shards --------------------------------------------------------------------------

@dataclass
class FeatureBlock:
    """Rows [start, stop) of one shard, or an in-memory array (`array`)."""
    uri: str | None
    start: int
    stop: int
    array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class FeatureSet:
    blocks: list[FeatureBlock]
    labels: np.ndarray  # int64, one per row over all blocks in order; negative: a distractor
    dim: int

    def __len__(self) -> int:
        return len(self.labels)

    def block_labels(self) -> list[np.ndarray]:
        bounds = np.cumsum([0] + [len(b) for b in self.blocks])
        return [self.labels[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def from_array(features: np.ndarray, labels, block_size: int = DEFAULT_BLOCK) -> "FeatureSet":
        features = np.ascontiguousarray(features, np.float32)
        labels = np.asarray(labels, np.int64)
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} features but {len(labels)} labels")
        blocks = [FeatureBlock(None, s, min(s + block_size, len(features)), features[s:s + block_size])
                  for s in range(0, len(features), block_size)]
        return FeatureSet(blocks, labels, features.shape[1] if features.ndim == 2 else 0)

    def concat(self, other: "FeatureSet") -> "FeatureSet":
        if self.dim != other.dim and len(self) and len(other):
            raise ValueError(f"feature sizes differ: {self.dim} and {other.dim}")
        return FeatureSet(self.blocks + other.blocks, np.r_[self.labels, other.labels], self.dim or other.dim)


def _npy_header(fh) -> tuple[tuple, np.dtype, int]:
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(fh)
    if fortran or dtype.hasobject:
        raise ValueError("feature shards must be C-ordered numeric .npy arrays")
    return shape, dtype, fh.tell()


def read_block(block: FeatureBlock) -> np.ndarray:
    """The block's rows as float32, reading only those rows (a ranged read of an .npy shard;
    a Parquet shard is read whole, which its writer keeps to block size)."""
    if block.array is not None:
        return np.asarray(block.array, np.float32)
    if block.uri.endswith(".npy"):
        with storage.open_input(block.uri) as fh:
            shape, dtype, offset = _npy_header(fh)
            row = int(np.prod(shape[1:])) * dtype.itemsize
            fh.seek(offset + block.start * row)
            data = fh.read(len(block) * row)
        return np.frombuffer(data, dtype).reshape(len(block), *shape[1:]).astype(np.float32)
    import pyarrow.parquet as pq

    with storage.open_input(block.uri) as fh:
        column = pq.read_table(fh, columns=["feature"]).column("feature").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), -1)[block.start:block.stop].astype(np.float32)


def write_features(out: str, features: np.ndarray, labels, paths: list[str] | None = None,
                   shard_rows: int = DEFAULT_BLOCK, fmt: str = "parquet", first_shard: int = 0) -> list[str]:
    """Feature shards under `out` (Parquet with `path`, `label`, `feature`; or .npy pairs)."""
    features = np.ascontiguousarray(features, np.float32)
    labels = np.asarray(labels, np.int64)
    written = []
    for n, start in enumerate(range(0, len(features), shard_rows), start=first_shard):
        rows = slice(start, start + shard_rows)
        if fmt == "npy":
            for kind, array in (("features", features[rows]), ("labels", labels[rows])):
                buf = io.BytesIO()
                np.save(buf, array)
                storage.write_bytes(storage.join(out, f"{kind}-{n:05d}.npy"), buf.getvalue())
            written.append(storage.join(out, f"features-{n:05d}.npy"))
            continue
        import pyarrow as pa
        import pyarrow.parquet as pq

        part = features[rows]
        table = pa.table({"path": pa.array(paths[rows] if paths else [""] * len(part), pa.string()),
                          "label": pa.array(labels[rows], pa.int64()),
                          "feature": pa.FixedSizeListArray.from_arrays(pa.array(part.ravel()), part.shape[1])})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        uri = storage.join(out, f"part-{n:05d}.parquet")
        storage.write_bytes(uri, buf.getvalue())
        written.append(uri)
    return written


def open_features(uri: str, block_size: int = DEFAULT_BLOCK) -> FeatureSet:
    """The feature shards under `uri` as blocks; only labels are read here."""
    files = storage.list_files(uri, recursive=False)
    npy = sorted(f for f in files if storage.name(f).startswith("features-") and f.endswith(".npy"))
    parquet = sorted(f for f in files if f.endswith(".parquet"))
    if not npy and not parquet:
        raise FileNotFoundError(f"{uri}: no feature shards (features-NNNNN.npy + labels-NNNNN.npy, or *.parquet)")
    blocks, labels, dim = [], [], 0
    for shard in npy or parquet:
        if npy:
            label_uri = shard[: -len(storage.name(shard))] + storage.name(shard).replace("features-", "labels-")
            if not storage.exists(label_uri):
                raise FileNotFoundError(f"{shard}: no {storage.name(label_uri)} beside it")
            shard_labels = np.load(io.BytesIO(storage.read_bytes(label_uri)), allow_pickle=False).astype(np.int64)
            with storage.open_input(shard) as fh:
                shape, _, _ = _npy_header(fh)
            if shape[0] != len(shard_labels):
                raise ValueError(f"{shard}: {shape[0]} features but {len(shard_labels)} labels")
            dim = shape[1]
        else:
            import pyarrow.parquet as pq

            with storage.open_input(shard) as fh:
                meta = pq.ParquetFile(fh)
                shard_labels = meta.read(columns=["label"]).column("label").to_numpy().astype(np.int64)
                dim = meta.schema_arrow.field("feature").type.list_size
        labels.append(shard_labels)
        blocks += [FeatureBlock(shard, s, min(s + block_size, len(shard_labels)))
                   for s in range(0, len(shard_labels), block_size)]
    return FeatureSet(blocks, np.concatenate(labels), int(dim))


# -- running tasks -------------------------------------------------------------------------

class LocalRunner:
    """Tasks in the driver, one after another (no Ray)."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def map(self, fn, arg_lists):
        for args in arg_lists:
            yield fn(*args, self.device, 0)


class RayRunner:
    """Each call one Ray task (one GPU each with gpu=True, else `cpus` cores with as many
    torch threads); at most `in_flight` pending, results yielded as they finish."""

    def __init__(self, gpu: bool = False, cpus: int = 1, in_flight: int | None = None):
        import ray

        self.ray, self.gpu, self.cpus = ray, gpu, cpus
        total = ray.cluster_resources().get("GPU" if gpu else "CPU", 1)
        self.in_flight = in_flight or max(2, int(2 * total / (1 if gpu else cpus)))

    def map(self, fn, arg_lists):
        remote = self.ray.remote(fn).options(num_cpus=self.cpus, num_gpus=1 if self.gpu else 0, max_retries=2)
        device = "cuda" if self.gpu else "cpu"
        pending = []
        for args in arg_lists:
            pending.append(remote.remote(*args, device, self.cpus))
            if len(pending) >= self.in_flight:
                done, pending = self.ray.wait(pending, num_returns=1)
                yield self.ray.get(done[0])
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield self.ray.get(done[0])


def default_runner(gpu: bool = False):
    """Ray tasks when Ray is initialised (or RAY_ADDRESS names a cluster), else the driver."""
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None and (ray.is_initialized() or os.environ.get("RAY_ADDRESS")):
        if not ray.is_initialized():
            ray.init(address=os.environ["RAY_ADDRESS"])
        return RayRunner(gpu=gpu)
    return LocalRunner("cuda" if gpu else "cpu")


def _load(block: FeatureBlock, device: str) -> torch.Tensor:
    return core.normalize(read_block(block), device)


def _verification_task(left, left_labels, right, right_labels, plan, diagonal, impostors, tile_elements,
                       device, threads):
    if threads:
        torch.set_num_threads(threads)
    a = _load(left, device)
    b = a if diagonal else _load(right, device)
    return core.reduce_verification_block(a, left_labels, b, right_labels, plan, diagonal, impostors, tile_elements)


def _search_task(index, probes, probe_labels, gallery, gallery_labels, gallery_offset, k, tile_elements, device,
                 threads):
    if threads:
        torch.set_num_threads(threads)
    return index, core.search_block(_load(probes, device), probe_labels, _load(gallery, device), gallery_labels, k,
                                    gallery_offset, tile_elements)


# -- the engine ------------------------------------------------------------------------------

@dataclass
class PairSpace:
    """A set of pairs: all i < j of `left` (right None), or every (left, right) pair.
    `impostors=False`: only its genuine pairs count (MegaFace's probe-probe pairs)."""
    left: FeatureSet
    right: FeatureSet | None = None
    impostors: bool = True

    def counts(self) -> tuple[int, int]:
        genuine, impostor = core.pair_counts(self.left.labels, None if self.right is None else self.right.labels)
        return genuine, impostor if self.impostors else 0

    def block_pairs(self):
        lefts = list(zip(self.left.blocks, self.left.block_labels()))
        if self.right is None:
            for i, (a, la) in enumerate(lefts):
                for j in range(i, len(lefts)):
                    b, lb = lefts[j]
                    yield a, la, b, lb, i == j
        else:
            for a, la in lefts:
                for b, lb in zip(self.right.blocks, self.right.block_labels()):
                    yield a, la, b, lb, False


@dataclass
class EngineStats:
    tasks: int = 0
    pairs: int = 0
    seconds: float = 0.0
    passes: int = 0


def verify(spaces: list[PairSpace], fars, runner=None, topk_limit: int = TOPK_LIMIT,
           tile_elements: int = 1 << 24, stats: EngineStats | None = None) -> core.VerificationResult:
    """TAR at each FAR over the union of the pair spaces, exact (see arcface_core.large_scale)."""
    runner = runner or default_runner()
    stats = stats if stats is not None else EngineStats()
    start = time.perf_counter()
    impostors = sum(s.counts()[1] for s in spaces)
    targets = core.plan_targets(fars, impostors, topk_limit)
    plan = core.first_pass_plan(targets, impostors)

    def run(pass_plan):
        jobs = [(a, la, b, lb, pass_plan, diagonal, s.impostors, tile_elements)
                for s in spaces for a, la, b, lb, diagonal in s.block_pairs()]
        merged = core.VerificationPartial()
        for part in runner.map(_verification_task, jobs):
            merged.merge(part, pass_plan.top_k)
        stats.tasks += len(jobs)
        stats.passes += 1
        return merged

    merged = run(plan)
    if merged.impostors != impostors:
        raise RuntimeError(f"the blocks counted {merged.impostors} impostor pairs, the labels say {impostors}")
    second = core.second_pass_plan(targets, merged)
    if second is not None:
        merged.fine = run(second).fine
    result = core.finish_verification(targets, merged)
    stats.pairs += sum(sum(s.counts()) for s in spaces)
    stats.seconds += time.perf_counter() - start
    return result


def search(probes: FeatureSet, gallery: FeatureSet, k: int, runner=None, tile_elements: int = 1 << 24,
           stats: EngineStats | None = None) -> core.SearchPartial:
    """Per probe: top-k non-mate gallery scores and indices, best mate score (exact)."""
    runner = runner or default_runner()
    stats = stats if stats is not None else EngineStats()
    start = time.perf_counter()
    gallery_bounds = np.cumsum([0] + [len(b) for b in gallery.blocks])
    jobs = [(i, p, lp, g, lg, int(gallery_bounds[j]), k, tile_elements)
            for i, (p, lp) in enumerate(zip(probes.blocks, probes.block_labels()))
            for j, (g, lg) in enumerate(zip(gallery.blocks, gallery.block_labels()))]
    merged = [core.SearchPartial.empty(len(b), k) for b in probes.blocks]
    for i, part in runner.map(_search_task, jobs):
        merged[i].merge(part)
    stats.tasks += len(jobs)
    stats.passes += 1
    stats.pairs += len(probes) * len(gallery)
    stats.seconds += time.perf_counter() - start
    if not merged:
        return core.SearchPartial.empty(0, k)
    return core.SearchPartial(torch.cat([m.top_scores for m in merged]), torch.cat([m.top_index for m in merged]),
                              torch.cat([m.mate for m in merged]))
