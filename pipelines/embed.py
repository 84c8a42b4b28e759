"""Embed a refined dataset with a model, as a Ray job (CPU or GPU actors).

Each actor loads the model once (an MLflow model URI or a training checkpoint) and embeds
whole shards: it reads a shard's images, decodes them on a thread pool, embeds in batches
(with the flip test) and writes `embeddings/<model tag>/part-NNNNN.parquet` beside the
shards, one row per shard row in the same order (key, label, embedding). The model tag is a
hash of the model URI, so embeddings of different models never mix and a rerun skips the
shards already embedded.

Why actors over whole shards rather than Ray Data's map_batches: the output stays aligned
row for row with its shard (stage 2 writes decisions back by position), and a shard is the
unit of resume.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from cleaning import rewrite, shards, storage
from pipelines.logs import progress

log = logging.getLogger(__name__)


def model_tag(model_uri: str) -> str:
    return hashlib.sha256(model_uri.encode()).hexdigest()[:12]


def embeddings_dir(data: str, model_uri: str) -> str:
    return storage.join(data, "embeddings", model_tag(model_uri))


class ShardEmbedder:
    """One per Ray actor: the model, loaded once."""

    def __init__(self, model_uri: str, device: str, threads: int, batch: int):
        import torch

        from pipelines.registry import load_embedder

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
                                              "embedding": column}))
        return table.num_rows


def embed_dataset(data: str, model_uri: str, workers: int = 2, gpu: bool = False, batch: int = 256) -> str:
    """Embed every shard of `data` (skipping those done); returns the embeddings folder."""
    manifest = rewrite.read_manifest(data)
    out_dir = embeddings_dir(data, model_uri)
    todo = [(storage.join(data, "shards", n), storage.join(out_dir, n)) for n in manifest["shards"]]
    todo = [(s, o) for s, o in todo if not storage.exists(o)]
    if todo:
        from pipelines.ray_connect import connect

        connect(num_cpus=max(2, workers))
        import ray

        # CPU actors share the free CPUs, but no actor asks for more than one node has.
        largest_node = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
        free = int(ray.available_resources().get("CPU", workers))
        cpus = max(1, min(largest_node, free // max(1, workers))) if not gpu else 2
        actor = ray.remote(num_cpus=cpus if not gpu else 1, num_gpus=1 if gpu else 0)(ShardEmbedder)
        actors = [actor.remote(model_uri, "cuda" if gpu else "cpu", cpus, batch)
                  for _ in range(min(workers, len(todo)))]
        pool = ray.util.ActorPool(actors)
        for _ in progress(pool.map_unordered(lambda a, job: a.embed_shard.remote(*job), todo), total=len(todo),
                          desc="embedding shards"):
            pass
        for a in actors:
            ray.kill(a)
    log.info("embeddings of %d shards in %s", len(manifest["shards"]), out_dir)
    return out_dir


def read_embeddings(data: str, model_uri: str) -> tuple[np.ndarray, list[str], list[int]]:
    """(embeddings (N, D), keys, rows per shard) in shard order, checked against the shards."""
    manifest = rewrite.read_manifest(data)
    out_dir = embeddings_dir(data, model_uri)
    embs, keys, sizes = [], [], []
    for name in manifest["shards"]:
        table = shards.read_table(storage.join(out_dir, name))
        column = table.column("embedding").combine_chunks()
        dim = column.type.list_size
        embs.append(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim))
        keys += table.column("key").to_pylist()
        sizes.append(table.num_rows)
    return np.concatenate(embs), keys, sizes
