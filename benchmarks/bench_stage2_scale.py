"""Stage 2's decisions as the dataset grows: time, peak memory and quality of the de-noise
steps (cleaning/denoise.py) on synthetic embeddings with known truth, at sizes growing 10x.

Usage (writes benchmarks/results/stage2_scale.{json,md}):
    .venv/bin/python benchmarks/bench_stage2_scale.py [--faces 100000 1000000 5800000 --dim 512 --noise 0.4]
        [--store memory shards ray]

The embeddings stand in for a bootstrap model's (no rendering, no model): identities have
random unit centres in `--dim` dimensions, and a face lies at an angle drawn from the clean
distribution measured on the demo (about 15 +- 6 deg) from its person's centre, in a random
direction. Injected, as in raw MS-Celeb:
  * label noise: `--noise` of the faces are another person's, filed under the identity;
  * duplicate identities: 1 in 200 identities is a second filing of another one (the faces
    of both come from one person's distribution; how far a bootstrap pushes the two apart
    is not modelled - on the demo 15-46% of their faces still crossed - so this measures
    cost, and whether look-alikes stay apart, more than the duplicate rule);
  * look-alikes: 1 in 20 identities has its centre 25-35 deg from another's (distinct
    people who resemble each other: what a merge rule must not join);
  * evaluation overlap: 1 in 1000 identities also has 6 faces in the evaluation set, among
    the faces of as many held-out people.
Each size runs in a fresh process (peak RSS measured by the OS), the whole stage 2 as
`arcface denoise` runs it after embedding: IntraClassOutliers (derived threshold) ->
MergeIdentities -> EvaluationOverlap -> SmallIdentities -> contiguous labels. Embeddings:
`memory` one array; `shards` embedding shards on disk, read pass by pass by this process;
`ray` the same shards, each pass run as 2 parallel Ray tasks of one shard each (a local Ray
with 2 CPUs; the peak of every Ray worker process is reported too). Sizes whose embeddings
alone would not fit in memory are reported, not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cleaning.stage1 import peak_rss_mib  # noqa: E402
from benchmarks.scaling import growth_exponents, measure_in_process, report  # noqa: E402

FACES_PER_IDENTITY = 68  # MS1MV2: 5.8M faces / 85.7K identities


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rotate_towards(centres: np.ndarray, angles_deg: np.ndarray, rng) -> np.ndarray:
    """Unit vectors at `angles_deg` from `centres`, in random directions."""
    u = rng.standard_normal(centres.shape, dtype=np.float32)
    u -= (u * centres).sum(1, keepdims=True) * centres
    u = _unit(u)
    a = np.radians(angles_deg)[:, None].astype(np.float32)
    return np.cos(a) * centres + np.sin(a) * u


def synthetic_set(faces: int, dim: int, noise: float, seed: int = 0, chunk: int = 50_000, shard_dir: Path | None = None):
    """(embeddings, filed labels, truth dict, evaluation embeddings). The embeddings are an
    (N, D) float32 array, or with `shard_dir` embedding shards written there (`chunk` rows
    each, the format `arcface denoise` reads) and a ShardEmbeddings over them."""
    rng = np.random.default_rng(seed)
    ids = max(2, faces // FACES_PER_IDENTITY)
    centres = _unit(rng.standard_normal((ids, dim), dtype=np.float32))
    person = np.arange(ids)  # the person each filed identity is
    duplicates = rng.choice(ids, size=max(1, ids // 200) * 2, replace=False).reshape(-1, 2)
    for copy, orig in duplicates:
        centres[copy] = centres[orig]
        person[copy] = person[orig]
    taken = set(duplicates.ravel().tolist())
    free = np.array([i for i in range(ids) if i not in taken])
    looks = rng.choice(free, size=max(1, ids // 20) * 2, replace=False).reshape(-1, 2)
    for a, b in looks:
        centres[a] = _rotate_towards(centres[b:b + 1], rng.uniform(25, 35, 1), rng)[0]
    filed = np.sort(rng.integers(0, ids, faces))  # identity-sorted, as stage-1 shards are
    true_id = filed.copy()
    noisy = rng.random(faces) < noise
    others = rng.integers(0, ids - 1, int(noisy.sum()))
    true_id[noisy] = others + (others >= filed[noisy])  # anyone but the filed identity
    emb = np.empty((faces, dim), np.float32) if shard_dir is None else None
    uris = []
    for s in range(0, faces, chunk):  # the generator itself stays at one chunk of temporaries
        e = slice(s, min(s + chunk, faces))
        angles = np.abs(rng.normal(15, 6, e.stop - e.start))
        block = _rotate_towards(centres[true_id[e]], angles, rng)
        if emb is not None:
            emb[e] = block
            continue
        import pyarrow as pa

        from dataset import shards

        uris.append(str(shard_dir / f"part-{len(uris):05d}.parquet"))
        column = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim)
        shards.write_table(uris[-1], pa.table({"key": pa.array(np.arange(e.start, e.stop).astype(str)),
                                               "embedding": column}), compression="none")
    if emb is None:
        from pipelines.embed import ShardEmbeddings

        emb = ShardEmbeddings(uris, [min(chunk, faces - s) for s in range(0, faces, chunk)], dim)
    overlap = rng.choice(np.setdiff1d(free, looks.ravel()), size=max(1, ids // 1000), replace=False)
    held_out = _unit(rng.standard_normal((len(overlap), dim), dtype=np.float32))
    eval_centres = np.concatenate([centres[overlap], held_out])
    eval_emb = _rotate_towards(np.repeat(eval_centres, 6, axis=0), np.abs(rng.normal(15, 6, 6 * len(eval_centres))), rng)
    truth = {"identities": ids, "noisy": noisy, "person": person, "duplicates": duplicates, "lookalikes": looks,
             "overlap": overlap}
    return emb, filed, truth, eval_emb


def run_size(faces: int, dim: int, noise: float, shard_dir: Path | None = None, parallel: int = 0) -> dict:
    """One size, in this process: generate, then the stage-2 steps, timed."""
    from cleaning.denoise import EmbeddedSet, contiguous_labels
    from pipelines.denoise_config import DenoiseConfig
    from pipelines.stage2_ray import denoise_steps

    t = time.perf_counter()
    emb, filed, truth, eval_emb = synthetic_set(faces, dim, noise, shard_dir=shard_dir)
    times = {"generate_s": time.perf_counter() - t}
    if parallel > 1:
        from pipelines.ray_connect import connect

        t = time.perf_counter()
        connect("", num_cpus=parallel)
        times["ray_start_s"] = time.perf_counter() - t
        emb.parallel = parallel
    names = np.array([f"id{i}" for i in range(truth["identities"])], object)  # one object per identity
    # The peak reported is the steps', not the generator's (which writes the shards through
    # Arrow: 980 MiB at 1M faces, more than the steps): record it, then restart the count.
    generate_peak = peak_rss_mib()
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    _reset_peak_rss()
    data = EmbeddedSet(emb, filed.astype(np.int64), names[filed])
    steps = denoise_steps(DenoiseConfig(), eval_emb)  # as `arcface denoise` builds them from the defaults
    for step in steps:
        t = time.perf_counter()
        step(data)
        times[f"{step.name}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    contiguous_labels(data)
    times["relabel_s"] = time.perf_counter() - t
    noisy = truth["noisy"]
    flagged = data.reasons == "intra_class/far_from_identity_centre"
    person = truth["person"]
    merges = [m.groups for m in steps[1].merges]
    right = sum(1 for g in merges if len({person[x] for x in g}) == 1)
    wanted = {frozenset(map(int, p)) for p in truth["duplicates"]}
    found_dups = sum(1 for g in merges if frozenset(g) in wanted)
    overlap_found = {int(x[2:]) for x in steps[2].figures["identities_by_embedding"]}
    return {
        "faces": faces, "identities": int(truth["identities"]), "dim": dim, "noise": noise, "times": times,
        "embeddings": "ray" if parallel > 1 else "shards" if shard_dir else "memory",
        "other_processes_peak_rss_mib": _children_peak_rss_mib(), "generate_peak_rss_mib": generate_peak,
        "steps_total_s": sum(v for k, v in times.items() if k not in ("generate_s", "ray_start_s")),
        "threshold_deg": steps[0].figures["max_angle"],
        "noise_precision": float((flagged & noisy).sum() / max(1, flagged.sum())),
        "noise_recall": float((flagged & noisy).sum() / max(1, noisy.sum())),
        "clean_kept": float((~flagged & ~noisy).sum() / max(1, (~noisy).sum())),
        "merges_right": right, "merges_wrong": len(merges) - right,
        "duplicates_merged": found_dups, "duplicates": len(wanted),
        "overlap_found": len(overlap_found & set(truth["overlap"].tolist())),
        "overlap_truth": len(truth["overlap"]), "overlap_wrong": len(overlap_found - set(truth["overlap"].tolist())),
    }


def _reset_peak_rss() -> None:
    """Restart this process's VmHWM from its current resident size (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _children_peak_rss_mib() -> float:
    """The largest peak resident memory (VmHWM) among this process's descendants (the local
    Ray's workers and daemons); 0 when there are none."""
    import psutil

    return max((peak_rss_mib(child.pid) for child in psutil.Process().children(recursive=True)), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--memory-gib", type=float, default=20.0,
                    help="sizes whose embeddings take more than a third of this are reported, not run")
    ap.add_argument("--store", nargs="+", choices=["memory", "shards", "ray"], default=["shards"],
                    help="embeddings in one array, in shards on disk read pass by pass by this process, or the "
                         "shards read by 2 parallel Ray tasks per pass (as arcface denoise does)")
    ap.add_argument("--parallel", type=int, default=0, help=argparse.SUPPRESS)  # internal: Ray tasks per pass
    ap.add_argument("--work", default="", help="folder for the shards (default: a temporary one)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.one:
        result = run_size(args.one, args.dim, args.noise, Path(args.work) if args.work else None, args.parallel)
        result["peak_rss_mib"] = peak_rss_mib()
        report(result)
        return
    import shutil
    import tempfile

    rows = []
    for store in args.store:
        for faces in args.faces:
            need_gib = faces * args.dim * 4 / 2 ** 30
            if store == "memory" and need_gib > args.memory_gib / 3:
                rows.append({"faces": faces, "embeddings": store, "skipped": f"embeddings alone {need_gib:.1f} GiB; "
                                                                             "held in memory, about 3x that"})
                print(rows[-1], flush=True)
                continue
            work = Path(tempfile.mkdtemp(prefix="stage2-scale-", dir=args.work or None)) if store != "memory" else None
            try:
                rows.append({"faces": faces, "embeddings": store,
                             **measure_in_process([__file__, "--one", str(faces), "--dim", str(args.dim),
                                                   "--noise", str(args.noise), *(["--work", str(work)] if work else []),
                                                   *(["--parallel", "2"] if store == "ray" else [])])})
            finally:
                if work:
                    shutil.rmtree(work, ignore_errors=True)
            print(rows[-1], flush=True)
    growth = {}
    for store in args.store:
        g = growth_exponents([r for r in rows if "times" in r and r["embeddings"] == store], "faces",
                             ["steps_total_s", "peak_rss_mib"])
        if g:
            growth[store] = {"from": g["from"], "to": g["to"], "steps_time": g["steps_total_s"],
                             "peak_rss": g["peak_rss_mib"]}
    command = "python benchmarks/bench_stage2_scale.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "dim": args.dim, "noise": args.noise, "growth_exponent": growth}
    out = Path(args.out)
    (out / "stage2_scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float) + "\n")
    md = ["# Stage 2's de-noise steps as the dataset grows (synthetic embeddings)", "",
          f"`{meta['command']}` on {meta['date']} ({meta['machine']}, {meta['cpus']} cpus); {args.dim}-d, "
          f"{args.noise:.0%} label noise, {FACES_PER_IDENTITY} faces per identity (MS1MV2's ratio), 1 in 200 "
          "identities filed twice, 1 in 20 with a look-alike 25-35 deg away, 1 in 1000 in the evaluation set. "
          "Embeddings `memory`: one array; `shards`: embedding shards of 50,000 rows on local disk, read pass by "
          "pass by the driver; `ray`: each pass as 2 parallel Ray tasks of one shard each, as `arcface denoise` "
          "runs them (denoise.pass_tasks). Peak RSS (VmHWM): the driver's during the steps (the generator's own "
          "peak is in the JSON) and the largest of any other process (Ray's workers and daemons).", "",
          "| embeddings | faces | identities | steps s | intra s | merge s | overlap s | driver peak MiB "
          "| other process peak MiB | threshold deg "
          "| noise P | noise R | clean kept | merges right / wrong | duplicates merged | overlap found / wrong |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "times" not in r:
            md.append(f"| {r['embeddings']} | {r['faces']:,} | | {r.get('skipped') or r.get('failed')} |" + " |" * 12)
            continue
        t = r["times"]
        md.append(f"| {r['embeddings']} | {r['faces']:,} | {r['identities']:,} | {r['steps_total_s']:.1f} "
                  f"| {t['intra_class_s']:.1f} "
                  f"| {t['merge_identities_s']:.1f} | {t['evaluation_overlap_s']:.1f} | {r['peak_rss_mib']:.0f} "
                  f"| {r['other_processes_peak_rss_mib']:.0f} "
                  f"| {r['threshold_deg']:.1f} | {r['noise_precision']:.4f} | {r['noise_recall']:.4f} "
                  f"| {r['clean_kept']:.4f} | {r['merges_right']} / {r['merges_wrong']} "
                  f"| {r['duplicates_merged']} / {r['duplicates']} | {r['overlap_found']}/{r['overlap_truth']} / "
                  f"{r['overlap_wrong']} |")
    for store, g in growth.items():
        md += ["", f"Growth exponent (time ~ faces^k), embeddings in {store}, from {g['from']:,} to {g['to']:,} "
                   f"faces: steps {g['steps_time']:.2f}, peak memory {g['peak_rss']:.2f}."]
    (out / "stage2_scale.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
