"""Embedding evaluation faces on Ray workers, or in this process.

`arcface evaluate` (pair sets, identification sets, IJB-B/C) and `arcface promote --pairs`
cut the faces of a set into *jobs* of at most `chunk` images. A job says where its images
are (a range of a `.bin` file, rows of a Parquet file, IJB image names with their
landmarks), never the images themselves: the worker that runs it reads them from their URI
(local or s3://), decodes them on a thread pool while the model embeds the previous batch,
and sends back only the features. The driver therefore holds no image bytes (IJB-C has
about 470K images), only the (N, D) features, gathered in job order into one array, from
which the metrics are computed once.

Two interchangeable runners:
  * `InProcess(embedder)`: jobs run here, one after the other (`workers=0`);
  * `RayWorkers(model_uri, workers, gpu)`: one Ray actor per worker, each loading the model
    once (pipelines/models.py `load_embedder`, as pipelines/embed.py's ShardEmbedder
    does), one GPU each with `gpu`; jobs go to whichever actor is free, results come back
    in job order.
Both run the same `FaceEmbeddingWorker` code on the same jobs, so they give the same
features.

A job is any picklable object with `count` (images), `raw` (True: IJB's unnormalised
face-plus-mirror features; False: the embedder's L2-normalised embeddings), `flip`, and
`open(cache)`, which returns a function from an image's position in the job to its aligned
uint8 (112, 112, 3) RGB face. `cache` is a dict the worker keeps between jobs (a `.bin`
file is one pickle: a worker unpacks it once, not once per job).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from pipelines.logs import Progress

log = logging.getLogger(__name__)

# Images per job: a multiple of the embedders' batches (128 for checkpoints, 256 for MLflow
# models), so a job embeds in the same batches as one long run over the set would.
CHUNK = 1024


class FaceEmbeddingWorker:
    """Runs jobs with one loaded embedder: reads and decodes a job's images on a thread pool
    (I/O to S3 and cv2 both release the GIL) while the model embeds the batch before."""

    def __init__(self, embedder, batch: int = 256, read_threads: int = 8):
        self.embedder, self.batch = embedder, batch
        self.pool = ThreadPoolExecutor(max(1, read_threads))
        self.cache: dict = {}

    def run(self, fn, *args):
        """A small piece of work where the images are (e.g. reading a set's labels)."""
        return fn(*args)

    def embed(self, job) -> np.ndarray:
        load = job.open(self.cache)
        faces = [self.pool.submit(load, i) for i in range(job.count)]  # the pool reads ahead
        out = []
        for start in range(0, job.count, self.batch):
            batch = np.stack([f.result() for f in faces[start:start + self.batch]])
            out.append(self.embedder.raw(batch) if job.raw else self.embedder(batch, job.flip))
        return np.concatenate(out).astype(np.float32, copy=False)


class ModelWorker(FaceEmbeddingWorker):
    """One per Ray actor: the model loaded once, from its URI, on this actor's device."""

    def __init__(self, model_uri: str, device: str, threads: int, batch: int, read_threads: int,
                 tracking_uri: str = ""):
        import torch

        from pipelines.models import load_embedder

        torch.set_num_threads(max(1, threads))
        self.failed: Exception | None = None
        try:
            if tracking_uri:  # a models:/ or runs:/ URI resolves on the driver's tracking server
                import mlflow

                mlflow.set_tracking_uri(tracking_uri)
            embedder = load_embedder(model_uri, device=device).embedder
        except Exception as exc:
            # Kept for the first call to raise: Ray reports an error in an actor's creation
            # only as a dead actor with the whole remote traceback as its message.
            self.failed, embedder = exc, None
        super().__init__(embedder, batch, read_threads)

    def run(self, fn, *args):
        if self.failed is not None:
            raise self.failed
        return super().run(fn, *args)

    def embed(self, job) -> np.ndarray:
        if self.failed is not None:
            raise self.failed
        return super().embed(job)


def _gather(jobs: list, results, desc: str) -> np.ndarray:
    """Job results (in job order) into one (N, D) array, with a progress bar over images."""
    total = sum(job.count for job in jobs)
    bar = Progress(desc, total=total, unit="image")
    out, at = None, 0
    try:
        for job, feats in zip(jobs, results):
            if len(feats) != job.count:
                raise RuntimeError(f"a worker returned {len(feats)} features for a job of {job.count} images")
            if out is None:
                out = np.empty((total, feats.shape[1]), np.float32)
            out[at:at + job.count] = feats
            at += job.count
            bar.update(job.count)
    finally:
        bar.close()
    return out if out is not None else np.zeros((0, 0), np.float32)


class InProcess:
    """Jobs run in this process with an embedder already loaded (`workers=0`)."""

    def __init__(self, embedder, batch: int = 256, read_threads: int = 8):
        self.worker = FaceEmbeddingWorker(embedder, batch, read_threads)

    def run(self, fn, *args):
        return fn(*args)

    def embed_jobs(self, jobs: list, desc: str = "embedding") -> np.ndarray:
        return _gather(jobs, (self.worker.embed(job) for job in jobs), desc)

    def close(self) -> None:
        self.worker.pool.shutdown()


def _unwrapped(get):
    """ray.get with a worker's own exception re-raised here (its one-line message, not Ray's
    wrapping of the remote traceback)."""
    import ray

    try:
        return get()
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


class RayWorkers:
    """`workers` Ray actors, each with the model loaded once; one GPU each with `gpu`.

    Connects to Ray as every job of the project does (pipelines/ray_connect.py: the cluster
    in `ray_address`, else a local Ray on 127.0.0.1). CPU actors share the free CPUs, and no
    actor asks for more than one node has."""

    def __init__(self, model_uri: str, workers: int, gpu: bool = False, ray_address: str = "", batch: int = 256,
                 read_threads: int = 8):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        from pipelines.ray_connect import connect

        connect(ray_address, num_cpus=max(2, workers))
        import ray

        tracking_uri = ""
        if model_uri.startswith(("models:/", "runs:/")):
            import mlflow

            tracking_uri = mlflow.get_tracking_uri()
        if gpu:
            cpus = 1
        else:
            largest_node = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
            free = int(ray.available_resources().get("CPU", workers))
            cpus = max(1, min(largest_node, free // workers))
        actor = ray.remote(num_cpus=cpus, num_gpus=1 if gpu else 0)(ModelWorker)
        self.actors = [actor.remote(model_uri, "cuda" if gpu else "cpu", cpus, batch, read_threads, tracking_uri)
                       for _ in range(workers)]
        log.info("evaluation: %d Ray worker(s) (%s) embedding with %s", workers,
                 "one GPU each" if gpu else f"{cpus} CPU(s) each", model_uri)

    def run(self, fn, *args):
        import ray

        return _unwrapped(lambda: ray.get(self.actors[0].run.remote(fn, *args)))

    def embed_jobs(self, jobs: list, desc: str = "embedding") -> np.ndarray:
        import ray

        pool = ray.util.ActorPool(self.actors)  # hands each job to a free actor; yields in job order
        results = pool.map(lambda actor, job: actor.embed.remote(job), jobs)
        return _unwrapped(lambda: _gather(jobs, results, desc))

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def as_runner(embedder):
    """A runner as is; a plain embedder (faces, flip -> embeddings; `.raw` for IJB) wrapped to
    run its jobs in this process."""
    return embedder if hasattr(embedder, "embed_jobs") else InProcess(embedder)


@contextmanager
def embedding_workers(model_uri: str, workers: int = 0, gpu: bool = False, ray_address: str = "",
                      batch: int = 256, read_threads: int = 8):
    """The runner that evaluates `model_uri`: in this process with `workers=0` (the model
    loaded here, on the GPU with `gpu`), else `workers` Ray actors. The model URI is checked
    (and a `models:/NAME@ALIAS` pinned to the version the alias names now, so every worker
    loads the same one) before any worker starts."""
    from pipelines.models import check_model_uri, load_embedder, pin_model_uri

    check_model_uri(model_uri)
    model_uri = pin_model_uri(model_uri)
    if workers <= 0:
        runner = InProcess(load_embedder(model_uri, device="cuda" if gpu else "cpu").embedder, batch, read_threads)
    else:
        runner = RayWorkers(model_uri, workers, gpu, ray_address, batch, read_threads)
    try:
        yield runner
    finally:
        runner.close()
