"""Training input from refined Parquet shards (local or S3), per Ray Train worker.

The sample order is defined globally, independent of the number of workers: epoch e's
order is a seeded permutation of the row groups, then a seeded shuffle of the samples
inside each window of `shuffle_rowgroups` row groups (the shuffle buffer). Global batch b
is samples [b·B, (b+1)·B) of that order and rank r of W takes its contiguous slice. So the
data position is just (epoch, step): a run resumed with a different worker count sees the
same global batches, and a 2-worker run sees what a 1-worker run sees.

Each worker reads only the row groups its slices touch (row groups are small: ~1000 faces)
and decodes the JPEGs into one uint8 batch buffer on a thread pool (OpenCV releases the
GIL), one batch ahead of the training step; colour order, the random horizontal flip and
normalisation run on the device (`device_input`), on the whole batch.

Why a per-worker reader rather than Ray Data: exact resume (also onto another worker count)
and the 1-vs-N-worker equivalence need a global sample order that is a pure function of
(seed, epoch, step); Ray Data's streaming split hands blocks to workers in arrival order.
The throughput comparison belongs to benchmarks/ (issue 8) and may revisit this.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch

from dataset import storage
from dataset.refined import RefinedDataset


@dataclass
class RowGroup:
    file: str
    index: int
    rows: int
    start: int  # global index of its first sample


class ShardDataset:
    """The row groups of a refined dataset's shards, addressed by global sample index."""

    def __init__(self, data: RefinedDataset | str):
        self.data = data if isinstance(data, RefinedDataset) else RefinedDataset.open(data)
        self.root = self.data.uri
        self.num_classes = self.data.num_classes
        self.content_hash = self.data.content_hash
        self.groups: list[RowGroup] = []
        start = 0
        for uri in self.data.shard_uris():
            fs, path = storage.resolve(uri)
            meta = pq.read_metadata(path, filesystem=fs)
            for i in range(meta.num_row_groups):
                rows = meta.row_group(i).num_rows
                self.groups.append(RowGroup(uri, i, rows, start))
                start += rows
        self.num_samples = start
        self._starts = np.array([g.start for g in self.groups], np.int64)  # for sample -> row group
        self._files: dict[str, pq.ParquetFile] = {}
        self._cache: dict[tuple[str, int], tuple[list, np.ndarray]] = {}

    def label_problem(self) -> str:
        """"" when every label of every shard lies in 0 .. num_classes - 1, else one line naming
        the shard, its row group and the labels found. Streamed: only the label column is
        read, one row group at a time (what the workers would train on, not the footers'
        statistics, which a writer may leave out or get wrong)."""
        if self.num_classes < 1:
            return f"{self.root}: the manifest's num_classes is {self.num_classes}: nothing to train"
        for g, group in enumerate(self.groups):
            labels = self._read_labels(group)
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                bad = labels[(labels < 0) | (labels >= self.num_classes)]
                return (f"{group.file}: row group {group.index}: {bad.size} of {labels.size} labels outside "
                        f"0 .. {self.num_classes - 1} (the manifest's num_classes), e.g. {int(bad[0])}: "
                        "a model trained on it would ignore those faces")
        return ""

    def _read_labels(self, group: RowGroup) -> np.ndarray:
        if group.file not in self._files:
            fs, path = storage.resolve(group.file)
            self._files[group.file] = pq.ParquetFile(fs.open_input_file(path))
        return self._files[group.file].read_row_group(group.index, columns=["label"]).column("label").to_numpy()

    def manifest_summary(self) -> dict:
        """The manifest without its per-identity map (lineage for trackers)."""
        return self.data.manifest.summary() | {"uri": self.root}

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_samples // global_batch

    def epoch_order(self, epoch: int, seed: int, shuffle_rowgroups: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(len(self.groups))
        order = []
        for w in range(0, len(perm), shuffle_rowgroups):
            window = np.concatenate([np.arange(self.groups[g].start, self.groups[g].start + self.groups[g].rows)
                                     for g in perm[w:w + shuffle_rowgroups]])
            order.append(rng.permutation(window))
        return np.concatenate(order) if order else np.zeros(0, np.int64)

    def _read_group(self, g: int) -> tuple[list, np.ndarray]:
        group = self.groups[g]
        key = (group.file, group.index)
        if key not in self._cache:
            if len(self._cache) > 16:  # a window's worth of row groups, at most
                self._cache.pop(next(iter(self._cache)))
            if group.file not in self._files:
                fs, path = storage.resolve(group.file)
                self._files[group.file] = pq.ParquetFile(fs.open_input_file(path))
            t = self._files[group.file].read_row_group(group.index, columns=["image", "label"])
            labels = t.column("label").to_numpy()
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                # The driver checked every shard; a shard changed since then is not trained on.
                raise ValueError(f"{group.file}: row group {group.index}: labels outside 0 .. {self.num_classes - 1}")
            self._cache[key] = (t.column("image").to_pylist(), labels)
        return self._cache[key]

    def fetch(self, samples: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        """The JPEG bytes and labels of global samples, in the order asked: one pass per row
        group touched rather than per sample."""
        starts = self._starts
        groups = np.searchsorted(starts, samples, side="right") - 1
        images: list = [None] * len(samples)
        labels = np.empty(len(samples), np.int64)
        for g in np.unique(groups):
            imgs, labs = self._read_group(int(g))
            where = np.flatnonzero(groups == g)
            offsets = samples[where] - starts[g]
            labels[where] = labs[offsets]
            for i, o in zip(where.tolist(), offsets.tolist()):
                images[i] = imgs[o]
        return images, labels


def decode_face(data: bytes, flip: bool) -> np.ndarray:
    """JPEG -> CHW float32 RGB in [-1, 1], mirrored when `flip`: one face the way a
    per-sample loader prepares it (the reference BatchStream + device_input must equal)."""
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    img = cv2.flip(img, 1) if flip else img
    return np.ascontiguousarray(((img.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1))


def _decode(data, shape: tuple) -> np.ndarray:
    face = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if face is None or face.shape != shape:
        got = "undecodable bytes" if face is None else f"a {face.shape[1]}x{face.shape[0]} image"
        raise ValueError(f"a training shard holds {got}; refined faces are {shape[1]}x{shape[0]} JPEGs "
                         "(was the dataset written by another tool?)")
    return face


def decode_into(out: np.ndarray, jpegs: list) -> None:
    """Decode JPEGs into rows of one (N, H, W, 3) uint8 buffer, BGR as OpenCV gives them:
    colour order, mirroring and normalisation happen on the device, on the whole batch."""
    for i, data in enumerate(jpegs):
        out[i] = _decode(data, out.shape[1:])


def decode_normalised_into(out: torch.Tensor, jpegs: list, flips: np.ndarray) -> None:
    """Decode JPEGs into rows of one (N, 3, H, W) float batch, RGB, mirrored where `flips`,
    in [-1, 1]: for a CPU "device", where the per-pixel work is cheapest done by the decode
    threads. Planes are split out by OpenCV straight into RGB order (a strided permute in
    torch cost 3x more), then one contiguous uint8 -> float pass (benchmarks/bench_data_path.py)."""
    n, _, h, w = out.shape
    planes = np.empty((n, 3, h, w), np.uint8)
    mirrored = np.empty((h, w, 3), np.uint8)
    for i, data in enumerate(jpegs):
        face = _decode(data, (h, w, 3))
        if flips[i]:
            face = cv2.flip(face, 1, dst=mirrored)
        cv2.split(face, [planes[i, 2], planes[i, 1], planes[i, 0]])  # B, G, R -> RGB planes
    out.copy_(torch.from_numpy(planes)).mul_(1 / 127.5).sub_(1.0)


def device_input(images: torch.Tensor, flips: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """(N, H, W, 3) uint8 BGR (pinned, for a GPU) -> (N, 3, H, W) RGB in [-1, 1] on `device`,
    mirrored where `flips`: a quarter of float32's bytes cross the bus, and the per-pixel work
    runs once per batch on the device. channels_last keeps the NHWC layout the bytes arrive in
    (fast convolutions on GPUs); otherwise the result is contiguous NCHW (torch 2.13's oneDNN
    1x1-convolution backward crashed on channels-last-strided CPU input)."""
    x = images.to(device, non_blocking=True)
    if flips is not None:
        mirror = flips.to(device, non_blocking=True).view(-1, 1, 1, 1)
        x = torch.where(mirror, x.flip(2), x)  # no boolean indexing: no host sync, fixed shapes
    rgb = x.permute(0, 3, 1, 2).flip(1)  # BGR -> RGB (a kernel, no index tensor to upload)
    out = torch.empty(rgb.shape, dtype=dtype, device=device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out.copy_(rgb)
    return out.mul_(1 / 127.5).sub_(1.0)


@dataclass
class FaceBatch:
    """This rank's share of one global batch, as it leaves the loader."""

    # (N, 112, 112, 3) uint8 BGR in one buffer (page-locked when feeding a GPU), or with
    # prepare_on_host the finished (N, 3, 112, 112) float batch
    images: torch.Tensor
    flips: torch.Tensor | None  # (N,) bool: mirror on the device (None: already done)
    labels: torch.Tensor  # (N,) int64
    samples: np.ndarray  # global sample indices (for checks and debugging)


def flip_mask(seed: int, epoch: int, samples: np.ndarray) -> np.ndarray:
    """Whether each sample is mirrored: a hash of (seed, epoch, sample), so the same on any
    worker count and on resume; vectorised (a generator per sample cost ~25% of loading)."""
    with np.errstate(over="ignore"):
        x = samples.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64((seed * 1_000_003 + epoch) % 2**63)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x & np.uint64(1)).astype(bool)


class BatchStream:
    """This rank's slices of the global batches from (epoch, step) on, decoded one ahead.

    Each batch is decoded straight into one buffer by `threads` tasks of a contiguous chunk
    each: OpenCV releases the GIL while decoding, and a task per chunk instead of per face
    keeps the Python hand-off cost per batch, not per image. For a GPU the buffer is uint8
    and page-locked (`pin_memory`: the copy is asynchronous and a quarter of float32's
    bytes), and the GPU does the rest (`device_input`). With `prepare_on_host` (training on
    the CPU) the decode threads finish the batch themselves: RGB, mirrored, normalised float."""

    def __init__(self, data: ShardDataset, global_batch: int, rank: int, world: int, seed: int = 0,
                 shuffle_rowgroups: int = 4, threads: int = 2, flip: bool = True, pin_memory: bool = False,
                 prepare_on_host: bool = False, dtype: torch.dtype = torch.float32, face_size: int = 112):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} workers")
        self.data, self.global_batch, self.rank, self.world = data, global_batch, rank, world
        self.seed, self.shuffle_rowgroups, self.flip = seed, shuffle_rowgroups, flip
        self.threads, self.pin_memory, self.face_size = max(1, threads), pin_memory, face_size
        self.prepare_on_host, self.dtype = prepare_on_host, dtype
        self.pool = ThreadPoolExecutor(self.threads)  # JPEG decoding
        self.loader = ThreadPoolExecutor(1)  # assembles the next batch while the step runs
        self._orders: dict[int, np.ndarray] = {}

    def samples(self, epoch: int, step: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: self.data.epoch_order(epoch, self.seed, self.shuffle_rowgroups)}
        order = self._orders[epoch]
        local = self.global_batch // self.world
        lo = step * self.global_batch + self.rank * local
        return order[lo:lo + local]

    def _load(self, epoch: int, step: int) -> FaceBatch:
        ids = self.samples(epoch, step)
        jpegs, labels = self.data.fetch(ids)
        n = len(ids)
        flips = flip_mask(self.seed, epoch, ids) if self.flip else np.zeros(n, bool)
        bounds = np.linspace(0, n, min(self.threads, max(n, 1)) + 1).astype(int)
        spans = list(zip(bounds[:-1], bounds[1:]))
        size = self.face_size
        if self.prepare_on_host:
            images = torch.empty((n, 3, size, size), dtype=self.dtype)
            chunks = [self.pool.submit(decode_normalised_into, images[a:b], jpegs[a:b], flips[a:b]) for a, b in spans]
        else:
            # The caching host allocator reuses page-locked blocks only once their async copy is done.
            images = torch.empty((n, size, size, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
            buffer = images.numpy()
            chunks = [self.pool.submit(decode_into, buffer[a:b], jpegs[a:b]) for a, b in spans]
        for chunk in chunks:
            chunk.result()
        labels, flips = torch.from_numpy(labels), torch.from_numpy(flips)
        if self.pin_memory:  # so that their copies are asynchronous too
            labels, flips = labels.pin_memory(), flips.pin_memory()
        return FaceBatch(images, None if self.prepare_on_host else flips, labels, ids)

    def iterate(self, epoch: int, start_step: int, end_step: int):
        """Yields (step, FaceBatch) with the next batch decoding in the background."""
        if start_step >= end_step:
            return
        future = self.loader.submit(self._load, epoch, start_step)
        for step in range(start_step, end_step):
            batch = future.result()
            if step + 1 < end_step:
                future = self.loader.submit(self._load, epoch, step + 1)
            yield step, batch

    def close(self):
        self.loader.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
