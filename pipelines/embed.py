"""Embed a refined dataset with a model, as a Ray job (CPU or GPU actors).

Each actor loads the model once (an MLflow model URI or a training checkpoint) and embeds
whole shards: it reads a shard's images, decodes them on a thread pool, embeds in batches
(with the flip test) and writes the dataset's embedding shard for that model
(`RefinedDataset.embedding_shard`), one row per shard row in the same order (key, label,
embedding). Embeddings of different models never mix, and a rerun skips the shards already
embedded.

Why actors over whole shards rather than Ray Data's map_batches: the output stays aligned
row for row with its shard (stage 2 writes decisions back by position), and a shard is the
unit of resume.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from cleaning.denoise import Embeddings
from dataset import shards, storage
from dataset.refined import RefinedDataset
from pipelines.logs import Progress

log = logging.getLogger(__name__)


class ShardEmbedder:
    """One per Ray actor: the model, loaded once."""

    def __init__(self, model_uri: str, device: str, threads: int, batch: int):
        import torch

        from pipelines.models import load_embedder

        torch.set_num_threads(max(1, threads))
        self.embedder = load_embedder(model_uri, device=device).embedder
        self.batch = batch
        self.pool = ThreadPoolExecutor(max(1, threads))

    def embed_shard(self, shard_uri: str, out_uri: str) -> int:
        from pipelines.evaluate import decode_aligned

        if storage.exists(out_uri):
            return 0
        table = shards.read_table(shard_uri, columns=["key", "label", "image"])
        images = table.column("image").to_pylist()
        chunks = [images[i:i + self.batch] for i in range(0, len(images), self.batch)]
        out = []
        for faces in self.pool.map(decode_aligned, chunks):  # decoding runs ahead of the model
            out.append(self.embedder(faces, True))
        emb = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
        dim = emb.shape[1] if emb.size else 0
        column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim)
        shards.write_table(out_uri, pa.table({"key": table.column("key"), "label": table.column("label"),
                                              "embedding": column}), compression="none")
        return table.num_rows


def embed_dataset(data: RefinedDataset, model_uri: str, workers: int = 2, gpu: bool = False, batch: int = 256,
                  ray_address: str = "") -> str:
    """Embed every shard of `data` (skipping those done); returns the embeddings folder."""
    todo = [(data.shard(n), data.embedding_shard(model_uri, n)) for n in data.manifest.shards]
    todo = [(s, o, shards.num_rows(s)) for s, o in todo if not storage.exists(o)]
    if todo:
        from pipelines.ray_connect import connect

        connect(ray_address, num_cpus=max(2, workers))
        import ray

        # CPU actors share the free CPUs, but no actor asks for more than one node has.
        largest_node = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
        free = int(ray.available_resources().get("CPU", workers))
        cpus = max(1, min(largest_node, free // max(1, workers))) if not gpu else 2
        actor = ray.remote(num_cpus=cpus if not gpu else 1, num_gpus=1 if gpu else 0)(ShardEmbedder)
        actors = [actor.remote(model_uri, "cuda" if gpu else "cpu", cpus, batch)
                  for _ in range(min(workers, len(todo)))]
        pool = ray.util.ActorPool(actors)
        bar = Progress("embedding", total=data.manifest.num_images, unit="face")
        bar.update(data.manifest.num_images - sum(rows for _, _, rows in todo))  # done on an earlier run
        for rows in pool.map_unordered(lambda a, job: a.embed_shard.remote(*job[:2]), todo):
            bar.update(rows)
        bar.close()
        for a in actors:
            ray.kill(a)
    log.info("embeddings of %d shards in %s", len(data.manifest.shards), data.embeddings(model_uri))
    return data.embeddings(model_uri)


def _embedding_block(uri: str) -> np.ndarray:
    """One embedding shard's (rows, D) float32, the embedding column alone."""
    column = shards.read_table(uri, columns=["embedding"]).column("embedding").combine_chunks()
    emb = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
    # Arrow's pool keeps what a read freed (200-450 MiB in stage 2's driver at 1M faces, not
    # growing with the dataset); handing it back after each shard cost 7-17% of a pass's time.
    return emb if emb.flags.writeable else emb.copy()


def _on_shard(fn, uri: str, start: int, *shared):
    """A Ray task: one pass's work on one embedding shard, read here rather than sent."""
    return fn(_embedding_block(uri), start, *shared)


class ShardEmbeddings(Embeddings):
    """A refined dataset's embeddings for one model, read shard by shard from storage on
    every pass (cleaning/denoise.Embeddings): what stage 2 holds of them is one shard, and
    the next one being read, however large the dataset (MS1MV2's 5.8M x 512 float32 is 12 GB).

    With `parallel` > 1 (Ray connected), each pass runs as Ray tasks, one per shard, at most
    `parallel` of them running and a few more queued: a task reads its shard and returns only
    its result (per-face numbers, per-identity sums), so the driver never receives embeddings."""

    def __init__(self, uris: list[str], sizes: list[int], dim: int, parallel: int = 0):
        self.uris, self.sizes, self._dim = uris, sizes, dim
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.parallel = parallel

    def map_blocks(self, fn, *shared):
        if self.parallel <= 1 or len(self.uris) < 2:
            yield from super().map_blocks(fn, *shared)
            return
        import ray

        task = ray.remote(num_cpus=1)(_on_shard)
        refs = [ray.put(x) for x in shared]  # once per pass: zero-copy for the tasks on this node
        pending: deque = deque()
        for start, uri in zip(self.starts.tolist(), self.uris):
            pending.append((start, task.remote(fn, uri, start, *refs)))
            if len(pending) >= 2 * self.parallel:  # results are taken in order; memory stays bounded
                first, ref = pending.popleft()
                yield first, ray.get(ref)
        while pending:
            first, ref = pending.popleft()
            yield first, ray.get(ref)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def dim(self) -> int:
        return self._dim

    def blocks(self):
        with ThreadPoolExecutor(1) as reader:  # the next shard is read while this one is used
            ahead = reader.submit(_embedding_block, self.uris[0]) if self.uris else None
            for i in range(len(self.uris)):
                emb = ahead.result()
                ahead = reader.submit(_embedding_block, self.uris[i + 1]) if i + 1 < len(self.uris) else None
                yield int(self.starts[i]), emb


def open_embeddings(data: RefinedDataset, model_uri: str, parallel: int = 0) -> ShardEmbeddings:
    """`data`'s embeddings by `model_uri` (embed_dataset first), each shard's keys checked
    against the dataset's shard, one shard at a time; passes over them run as `parallel` Ray
    tasks (0 or 1: in this process)."""
    uris, sizes, dim = [], [], 0
    for name in data.manifest.shards:
        uri = data.embedding_shard(model_uri, name)
        keys = shards.read_table(uri, columns=["key"]).column("key").to_pylist()
        if keys != shards.read_table(data.shard(name), columns=["key"]).column("key").to_pylist():
            raise RuntimeError(f"{data.uri}: embeddings are out of step with the shards; delete "
                               f"{data.embeddings(model_uri)} and rerun")
        uris.append(uri)
        sizes.append(len(keys))
        if not dim and keys:
            dim = _embedding_block(uri).shape[1]
    return ShardEmbeddings(uris, sizes, dim, parallel)


def read_embeddings(data: RefinedDataset, model_uri: str) -> tuple[np.ndarray, list[str], list[int]]:
    """(embeddings (N, D), keys, rows per shard) in shard order, all in memory (small sets)."""
    uris = [data.embedding_shard(model_uri, name) for name in data.manifest.shards]
    blocks = [_embedding_block(u) for u in uris]
    keys = [shards.read_table(u, columns=["key"]).column("key").to_pylist() for u in uris]
    return np.concatenate(blocks), [k for ks in keys for k in ks], [len(ks) for ks in keys]
