"""Large-scale verification and identification on Ray: MegaFace, Trillion-Pairs, MFR-ALL, YTF.

The engine. Features live in shards (`.npy` pairs `features-NNNNN.npy` + `labels-NNNNN.npy`,
or Parquet with `feature` and `label` columns; local or s3://). A `FeatureSet` cuts them
into blocks of at most `block_size` rows that never straddle a shard. Verification runs one
task per block pair (i <= j all-to-all; every pair probes x gallery): the task reads its two
blocks, scores them in tiles (`arcface_core.large_scale.reduce_verification_block`) and
returns the block's genuine scores, its impostor top-k and, for FARs whose k is too large
to keep, a 65,536-bin histogram; the driver merges as results arrive (`core.VerificationMerge`,
whose memory is one top-k buffer and the genuine scores, whatever the number of tasks). A
second pass runs only when a FAR needs the histogram refined. Identification runs one task
per (probe block, gallery block) and merges per-probe top-k lists. Memory per task: two
blocks plus one tile of scores, whatever N is. Tasks are Ray tasks (`num_gpus=1` with `gpu=True`) when Ray is
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
from pipelines.protocols import DEFAULT_BLOCK, PROTOCOLS

log = logging.getLogger(__name__)

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
        if not ray.is_initialized():  # a dashboard URL (arcface services env) joins this node's cluster
            from pipelines.ray_connect import connect

            connect(os.environ["RAY_ADDRESS"], num_cpus=os.cpu_count() or 2)
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
           tile_elements: int = 1 << 22, stats: EngineStats | None = None) -> core.VerificationResult:
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
        merged = core.VerificationMerge(pass_plan.top_k)
        for part in runner.map(_verification_task, jobs):
            merged.add(part)
        stats.tasks += len(jobs)
        stats.passes += 1
        return merged.partial()

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


def search(probes: FeatureSet, gallery: FeatureSet, k: int, runner=None, tile_elements: int = 1 << 22,
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


# -- embedding release images into feature shards --------------------------------------------

def local_image_embedder(embedder, flip: bool = True, batch: int = 256):
    """`embed_images(uris) -> features` for an in-process embedder: aligned face images
    (112x112; others are resized as pipelines/evaluate.py does) read, decoded, embedded."""
    from pipelines.evaluate import decode_aligned

    def embed_images(uris: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(uris), batch):
            chunk = uris[start:start + batch]
            try:
                faces = decode_aligned([storage.read_bytes(u) for u in chunk])
            except ValueError as err:  # name the file, not its index in the batch
                index = int(str(err).split()[1]) if str(err).startswith("image ") else 0
                raise ValueError(f"{chunk[index]}: not a decodable image") from None
            out.append(np.asarray(embedder(faces, flip), np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return embed_images


def embed_role(uris: list[str], labels: np.ndarray, embed_images, out: str, shard_rows: int = DEFAULT_BLOCK,
               block_size: int = DEFAULT_BLOCK) -> FeatureSet:
    """Embed `uris` shard by shard into Parquet feature shards under `out` (the driver holds
    one shard of features at a time); a complete earlier run (same paths) is reused."""
    labels = np.asarray(labels, np.int64)
    marker = storage.join(out, "_SUCCESS")
    digest = hashlib.sha256("\n".join(uris).encode()).hexdigest()
    if storage.exists(marker) and json.loads(storage.read_bytes(marker)).get("paths") == digest:
        return open_features(out, block_size)
    for n, start in enumerate(range(0, len(uris), shard_rows)):
        chunk = uris[start:start + shard_rows]
        features = np.asarray(embed_images(chunk), np.float32)
        if len(features) != len(chunk):
            raise ValueError(f"the embedder returned {len(features)} features for {len(chunk)} images")
        write_features(out, features, labels[start:start + shard_rows], chunk, shard_rows, "parquet", first_shard=n)
    storage.write_bytes(marker, json.dumps({"paths": digest, "images": len(uris)}).encode())
    return open_features(out, block_size)


def precomputed_role(uri: str, uris: list[str], block_size: int) -> FeatureSet:
    """Feature shards given with --features: their `path` column must list the role's images
    in order (labels come from the release, not from the shards)."""
    import pyarrow.parquet as pq

    fs = open_features(uri, block_size)
    if len(fs) != len(uris):
        raise ValueError(f"{uri}: {len(fs)} features for {len(uris)} images of the release")
    paths = []
    for shard in dict.fromkeys(b.uri for b in fs.blocks if b.uri and b.uri.endswith(".parquet")):
        with storage.open_input(shard) as fh:
            paths += pq.read_table(fh, columns=["path"]).column("path").to_pylist()
    if paths and paths != list(uris):
        raise ValueError(f"{uri}: the shards' paths are not the release's images in order")
    return fs


def read_all(fs: FeatureSet) -> np.ndarray:
    """Every row of a (small) feature set, e.g. MegaFace's probes."""
    return np.concatenate([read_block(b) for b in fs.blocks]) if fs.blocks else np.zeros((0, fs.dim), np.float32)


# -- release layouts ------------------------------------------------------------------------

def _list(uri: str, required: bool = True) -> list[str]:
    if not storage.exists(uri):
        if required:
            raise FileNotFoundError(f"{uri}: missing (see the layout in pipelines/large_scale.py)")
        return []
    lines = storage.read_bytes(uri).decode().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _digest(*uris: str) -> str:
    h = hashlib.sha256()
    for uri in uris:
        h.update(storage.read_bytes(uri) if storage.exists(uri) else b"-")
    return h.hexdigest()[:8]


def _listed(names: list[str], listed: set[str]) -> np.ndarray:
    """Whether each relative path is named by a list (by its path or its file name)."""
    return np.array([n in listed or n.rsplit("/", 1)[-1] in listed for n in names], bool)


@dataclass
class Role:
    """One group of a release's images: their URIs and labels (negative: a distractor)."""
    name: str
    uris: list[str]
    labels: np.ndarray


@dataclass
class Release:
    protocol: str
    root: str
    name: str  # <benchmark>-<first 8 hex of the protocol files' SHA-256>: results compare on the same lists
    roles: list[Role]
    info: dict = field(default_factory=dict)
    pairs: list[tuple[str, str, bool, int]] = field(default_factory=list)  # YTF: first, second, same, split


def load_megaface(root: str) -> Release:
    """MegaFace Challenge 1 (insightface's aligned pack: facescrub_lst, megaface_lst, image
    folders; the noise and duplicates lists honoured when present: listed probes and
    distractors are left out, and how many is reported)."""
    lists = {k: storage.join(root, k) for k in ("facescrub_lst", "megaface_lst", "facescrub_noises.txt",
                                                 "megaface_noises.txt", "megaface_duplicates.txt")}
    probes, distractors = _list(lists["facescrub_lst"]), _list(lists["megaface_lst"])
    noisy_probes = _listed(probes, set(_list(lists["facescrub_noises.txt"], False)))
    noisy = _listed(distractors, set(_list(lists["megaface_noises.txt"], False)) |
                    set(_list(lists["megaface_duplicates.txt"], False)))
    kept_probes = [p for p, bad in zip(probes, noisy_probes) if not bad]
    identity = [p.split("/")[0] for p in kept_probes]
    names = {n: i for i, n in enumerate(sorted(set(identity)))}
    kept = [d for d, bad in zip(distractors, noisy) if not bad]
    return Release("megaface", root, f"MegaFace-{_digest(*lists.values())}", [
        Role("probes", [storage.join(root, "facescrub_images", p) for p in kept_probes],
             np.array([names[i] for i in identity], np.int64)),
        Role("distractors", [storage.join(root, "megaface_images", d) for d in kept], -np.ones(len(kept), np.int64))],
        {"noisy_probes_removed": int(noisy_probes.sum()), "noisy_distractors_removed": int(noisy.sum())})


def load_trillion_pairs(root: str) -> Release:
    elfw_list, distractor_list = storage.join(root, "elfw_list.txt"), storage.join(root, "distractor_list.txt")
    rows = [line.split() for line in _list(elfw_list)]
    bad = [r for r in rows if len(r) != 2]
    if bad:
        raise ValueError(f"{elfw_list}: lines must be '<relative path> <identity>', got {' '.join(bad[0])!r}")
    names = {n: i for i, n in enumerate(sorted({r[1] for r in rows}))}
    distractors = _list(distractor_list)
    return Release("trillion-pairs", root, f"TrillionPairs-{_digest(elfw_list, distractor_list)}", [
        Role("elfw", [storage.join(root, r[0]) for r in rows], np.array([names[r[1]] for r in rows], np.int64)),
        Role("distractors", [storage.join(root, d) for d in distractors], -np.ones(len(distractors), np.int64))])


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def load_mfr(root: str) -> Release:
    """Identity folders of aligned faces (images/<identity>/*), all-to-all 1:1."""
    folder = storage.join(root, "images")
    files = sorted(f for f in storage.list_files(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{folder}: no images (the layout is images/<identity>/<image>)")
    identity = [f[len(folder):].strip("/").split("/")[0] for f in files]
    names = {n: i for i, n in enumerate(sorted(set(identity)))}
    digest = hashlib.sha256("\n".join(f[len(folder):] for f in files).encode()).hexdigest()[:8]
    return Release("mfr-all", root, f"MFR-ALL-{digest}", [Role("images", files, np.array([names[i] for i in identity]))])


def load_ytf(root: str) -> Release:
    """YouTube Faces: splits.txt (a header, then 'split, first video, second video, ...,
    same' per pair; a video is <person>/<number> under aligned_images_DB/)."""
    splits = storage.join(root, "splits.txt")
    pairs = []
    for n, line in enumerate(_list(splits)):
        cols = [c.strip() for c in line.split(",")]
        if not cols[0].isdigit():
            if n == 0:
                continue  # the header
            raise ValueError(f"{splits}: line {n + 1} does not start with a split number: {line!r}")
        if len(cols) < 4 or cols[-1] not in ("0", "1"):
            raise ValueError(f"{splits}: line {n + 1} is not 'split, first, second, ..., same': {line!r}")
        pairs.append((cols[1], cols[2], cols[-1] == "1", int(cols[0])))
    videos = sorted({v for a, b, _, _ in pairs for v in (a, b)})
    frames, labels = [], []
    for index, video in enumerate(videos):
        found = sorted(f for f in storage.list_files(storage.join(root, "aligned_images_DB", video))
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if not found:
            raise FileNotFoundError(f"{root}/aligned_images_DB/{video}: no frames for a video the splits name")
        frames += found
        labels += [index] * len(found)
    return Release("ytf", root, f"YTF-{_digest(splits)}", [Role("frames", frames, np.array(labels, np.int64))],
                   {"videos": len(videos)}, pairs)


LOADERS = {"megaface": load_megaface, "trillion-pairs": load_trillion_pairs, "mfr-all": load_mfr, "ytf": load_ytf}
assert tuple(LOADERS) == PROTOCOLS  # the CLI lists them from arcface_core without importing this module


# -- the protocols --------------------------------------------------------------------------

FARS = {"megaface": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
        "trillion-pairs": (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
        "mfr-all": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}
RANKS = (1, 5, 10)
FPIRS = (1e-3, 1e-2, 1e-1)


def _tar_figures(result: core.VerificationResult) -> dict:
    out = {f"tar_at_far_{far:g}": v for far, v in sorted(result.tar.items())}
    out.update({"genuine_pairs": result.genuine, "impostor_pairs": result.impostors, "roc": result.roc})
    return out


def enrolled_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trillion-Pairs identification: identities at even positions (by label) are enrolled
    with their first image; every other image of theirs is a mated probe, every image of
    the remaining identities a non-mated probe (the open-set protocol of IJB-C's 1:N)."""
    labels = np.asarray(labels)
    enrolled_ids = np.unique(labels)[::2]
    first = np.zeros(len(labels), bool)
    _, first_index = np.unique(labels, return_index=True)
    first[first_index] = True
    gallery = first & np.isin(labels, enrolled_ids)
    return gallery, ~gallery


def evaluate_release(release: Release, features: dict[str, FeatureSet], fars=None, ranks=RANKS, fpirs=FPIRS,
                     runner=None, tile_elements: int = 1 << 22, topk_limit: int = TOPK_LIMIT,
                     stats: EngineStats | None = None) -> dict:
    """The protocol's figures from its roles' features (names as the registry gates on them)."""
    runner = runner or default_runner()
    stats = stats if stats is not None else EngineStats()
    fars = tuple(fars or FARS.get(release.protocol, ()))
    k = max(ranks)
    out: dict = {}
    if release.protocol == "megaface":
        probes, distractors = features["probes"], features["distractors"]
        top = search(probes, distractors, k, runner, tile_elements, stats)
        ranked = core.megaface_ranks(core.normalize(read_all(probes)), probes.labels, top.top_scores, ranks)
        out.update({f"rank{r}": v for r, v in ranked.cmc.items()})
        ver = verify([PairSpace(probes, impostors=False), PairSpace(probes, distractors)], fars, runner, topk_limit,
                     tile_elements, stats)
        out.update(_tar_figures(ver))
        out.update({"trials": ranked.trials, "probes": len(probes), "distractors": len(distractors)})
    elif release.protocol == "trillion-pairs":
        elfw, distractors = features["elfw"], features["distractors"]
        ver = verify([PairSpace(elfw.concat(distractors))], fars, runner, topk_limit, tile_elements, stats)
        out.update(_tar_figures(ver))
        faces = read_all(elfw)  # ELFW's identities are thousands of images; the million distractors stay in shards
        in_gallery, is_probe = enrolled_split(elfw.labels)
        gallery = FeatureSet.from_array(faces[in_gallery], elfw.labels[in_gallery]).concat(distractors)
        probe_set = FeatureSet.from_array(faces[is_probe], elfw.labels[is_probe])
        found = search(probe_set, gallery, k, runner, tile_elements, stats)
        mated = np.isin(probe_set.labels, elfw.labels[in_gallery])
        ident = core.open_set_from_search(found, mated, ranks, fpirs)
        out.update({f"rank{r}": v for r, v in ident.cmc.items()})
        out.update({f"tpir_at_fpir_{f:g}": v for f, v in ident.tpir.items()})
        out.update({"mated_probes": ident.mated, "non_mated_probes": ident.non_mated, "gallery": len(gallery)})
    elif release.protocol == "mfr-all":
        out.update(_tar_figures(verify([PairSpace(features["images"])], fars, runner, topk_limit, tile_elements,
                                       stats)))
        out["images"] = len(features["images"])
    elif release.protocol == "ytf":
        out.update(ytf_accuracy(release, features["frames"]))
    else:
        raise ValueError(f"unknown protocol {release.protocol!r}")
    out.update(release.info)
    if release.protocol != "ytf":
        out.update({"pairs_scored": stats.pairs, "tasks": stats.tasks, "engine_seconds": round(stats.seconds, 3)})
    return out


def ytf_accuracy(release: Release, frames: FeatureSet) -> dict:
    """Each video's feature is the mean of its frames' normalised features; pairs scored as
    LFW's (squared L2 of normalised features), 10-fold accuracy with the splits as folds."""
    from arcface_core.metrics import pair_scores, roc_curve

    videos = int(frames.labels.max()) + 1 if len(frames) else 0
    sums, counts = np.zeros((videos, frames.dim)), np.zeros(videos)
    for block, labels in zip(frames.blocks, frames.block_labels()):  # streamed: a block at a time
        np.add.at(sums, labels, l2_normalize(read_block(block)))
        np.add.at(counts, labels, 1)
    names = sorted({v for a, b, _, _ in release.pairs for v in (a, b)})
    index = {v: i for i, v in enumerate(names)}
    means = sums / np.maximum(counts, 1)[:, None]
    order = sorted(range(len(release.pairs)), key=lambda i: release.pairs[i][3])  # split by split: folds = splits
    pairs = [release.pairs[i] for i in order]
    per_split = np.unique([p[3] for p in pairs], return_counts=True)[1]
    if len(set(per_split.tolist())) != 1:
        raise ValueError(f"{release.root}/splits.txt: the splits differ in size ({sorted(set(per_split.tolist()))}); "
                         "10-fold accuracy needs equal folds")
    first = means[[index[a] for a, _, _, _ in pairs]]
    second = means[[index[b] for _, b, _, _ in pairs]]
    same = np.array([s for _, _, s, _ in pairs])
    scores = pair_scores(first, second, "euclidean")
    folds = kfold_accuracy(scores, same, nfolds=len(per_split))
    far, tar, _ = roc_curve(scores, same)
    return {"accuracy": folds.accuracy, "accuracy_std": folds.std, "threshold": folds.threshold,
            "pairs": len(pairs), "folds": len(per_split), "roc": (far, tar)}


def table(name: str, results: dict) -> str:
    rows = [f"| {k} | {v:.4f} |" for k, v in results.items()
            if k.startswith(("tar_at_far_", "rank", "tpir_at_fpir_", "accuracy"))]
    counts = ", ".join(f"{k} {v}" for k, v in results.items() if isinstance(v, int))
    return "\n".join([f"{name}: {counts}", "", "| metric | value |", "|---|---:|", *rows])


def curves_png(results: dict[str, dict], title: str = "") -> bytes | None:
    """ROC (log FAR down to the finest measured) and, where ranks were measured, CMC."""
    roc = {n: m["roc"] for n, m in results.items() if "roc" in m}
    cmc = {n: sorted((int(k[4:]), v) for k, v in m.items() if k.startswith("rank") and k[4:].isdigit())
           for n, m in results.items()}
    cmc = {n: v for n, v in cmc.items() if v}
    if not roc and not cmc:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cleaning.report import figure_png

    fig, axes = plt.subplots(1, 2 if roc and cmc else 1, figsize=(10 if roc and cmc else 5, 4), squeeze=False)
    axes = list(axes[0])
    if roc:
        ax = axes.pop(0)
        finest = 1e-1
        for name, (far, tar) in roc.items():
            far, tar = np.asarray(far, float), np.asarray(tar, float)
            shown = far > 0
            if shown.any():
                finest = min(finest, float(far[shown].min()))
                ax.plot(far[shown], tar[shown], marker="o", ms=3, label=name)
        ax.set_xscale("log")
        ax.set_xlim(finest / 2, 1)
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_title(f"ROC {title}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if cmc:
        ax = axes.pop(0)
        for name, points in cmc.items():
            ax.plot([r for r, _ in points], [v for _, v in points], marker="o", label=name)
        ax.set_xlabel("rank")
        ax.set_ylabel("identification rate")
        ax.set_title(f"CMC {title}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    png = figure_png(fig)
    plt.close(fig)
    return png


# -- entry points ---------------------------------------------------------------------------

def run_release(protocol: str, release_dir: str, embed_images=None, features_dir: str | None = None,
                work: str | None = None, block_size: int = DEFAULT_BLOCK, fars=None, gpu: bool = False,
                runner=None, out: str | None = None, tile_elements: int = 1 << 22) -> dict[str, dict]:
    """Load a release, get its features (precomputed under features_dir/<role>/, or embedded
    with `embed_images(uris) -> features` into work/<role>/), evaluate, and write the curves
    to out/<protocol>.png. {release name: figures}."""
    if protocol not in LOADERS:
        raise ValueError(f"--protocol must be one of {', '.join(LOADERS)}, got {protocol!r}")
    release = LOADERS[protocol](release_dir)
    if features_dir is None and embed_images is None:
        raise ValueError("give precomputed features (--features DIR) or an embedder")
    if work is None:
        import tempfile

        work = tempfile.mkdtemp(prefix=f"arcface-{protocol}-")
    features = {}
    for role in release.roles:
        if features_dir:
            fs = precomputed_role(storage.join(features_dir, role.name), role.uris, block_size)
            fs.labels = role.labels
        else:
            fs = embed_role(role.uris, role.labels, embed_images, storage.join(work, release.name, role.name),
                            block_size, block_size)
        features[role.name] = fs
        log.info("%s %s: %d images", release.name, role.name, len(fs))
    results = {release.name: evaluate_release(release, features, fars, runner=runner or default_runner(gpu),
                                              tile_elements=tile_elements)}
    if out:
        png = curves_png(results, release.name)
        if png:
            storage.write_bytes(storage.join(out, f"{protocol}.png"), png)
    return results


def run_protocol(args, cfg, embedder) -> dict[str, dict]:
    """What `arcface evaluate --protocol P --release DIR` runs with the loaded embedder."""
    if not args.release:
        raise ValueError("--protocol needs --release DIR")
    embed = None if args.features else local_image_embedder(embedder, flip=not getattr(args, "no_flip", False))
    results = run_release(args.protocol, args.release, embed, args.features, args.work, args.block_size, args.far,
                          args.gpu, out=getattr(args, "out", None))
    for name, figures in results.items():
        print(table(name, figures))
    return results


def write_demo_releases(out: str, seed: int = 0) -> dict[str, dict]:
    """`arcface demo-data`: a small synthetic release of each protocol under out/<protocol>/."""
    from cleaning.synthetic.large_scale import write_releases

    return write_releases(out, seed=seed)
