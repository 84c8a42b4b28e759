"""Refinement judged by its worst seed (issue 29): the whole `arcface clean-data` loop on many demo
draws per label-noise level, noise kind and size, scored against the generator's truth.

Usage (per-case records under --work; the table in benchmarks/results/<results-name>.{json,md}):
    .venv/bin/python benchmarks/sweep_refinement_seeds.py --levels 0.45 0.4 0.3 0.5 \
        --kinds uniform confusable --seed-count 10 --identities 50 --images-per-identity 20
    ... --identities 200 --images-per-identity 30 --seed-count 5      # the larger size
    ... --report-only     # tabulate the finished cases only (the grid arguments say what is missing)
    ... --set denoise.rounds=3     # any config key, as `arcface --set`

Each case is what a user does: `arcface demo-data --identities I --images-per-identity P
--seed S --set demo.label_noise=L [--set demo.noise_sources=3]` (confusable noise: each
mislabelled face shows one of the identity's 3 look-alikes, as bench_refinement's
--noise-sources 3), then `arcface clean-data --config configs/demo-train.toml`; stage 2 is scored
with cleaning/synthetic/score.py. One JSON per case under --work (an interrupted sweep resumes
and skips the finished cases; a case's data is deleted once its JSON is written), with what
explains its mistakes: the stage-2 summary of the manifest (threshold, steps, merges), the
rounds that ran, and per identity the mislabelled faces kept and clean faces dropped, with
their angles to the identity's centre against the threshold.

Cases run in the order levels -> seeds -> kinds, so a sweep cut short has covered the first
levels for both kinds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cleaning.synthetic.score import _norm_key, outcomes, score_stage2
from pipelines.config import load_config

# Seeds the committed refinement sweeps (benchmarks/results/refinement_sweep*.json: 0, 1) and
# tests/test_denoise.py (5) were tuned on: a sweep of unseen draws leaves them out.
TUNED_SEEDS = {0, 1, 5}
NOISE_SOURCES = {"uniform": 0, "confusable": 3}
NOISE_REASON = "intra_class/far_from_identity_centre"


def unseen_seeds(count: int) -> list[int]:
    seeds, s = [], 0
    while len(seeds) < count:
        if s not in TUNED_SEEDS:
            seeds.append(s)
        s += 1
    return seeds


def case_name(identities: int, per_identity: int, level: float, kind: str, seed: int) -> str:
    return f"{identities}x{per_identity}/{kind}_noise{level:g}_seed{seed}"


def source_commit() -> str:
    """The commit this code is (the sweep runs from an exported snapshot, which has no git)."""
    stamp = ROOT / "SOURCE_COMMIT"
    if stamp.exists():
        return stamp.read_text().strip()
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "cleaning", "pipelines",
                                "dataset", "arcface_core", "configs"], capture_output=True, text=True, check=False).stdout
        return head.strip() + (" + uncommitted changes" if dirty.strip() else "")
    except OSError:
        return "unknown"


# -- one case -------------------------------------------------------------------------------

def run_case(args, level: float, kind: str, seed: int, work: Path) -> dict:
    from cleaning.synthetic.demo import generate
    from pipelines.clean_data import run_clean_data

    cfg = load_config(ROOT / "configs" / "demo-train.toml", overrides=args.set)
    demo = dataclasses.replace(cfg.demo, identities=args.identities, images_per_identity=args.images_per_identity,
                               seed=seed, label_noise=level, noise_sources=NOISE_SOURCES[kind])
    if work.exists():  # a case interrupted before its JSON: start it again from nothing
        shutil.rmtree(work)
    times = {}
    t = time.perf_counter()
    generate(work / "raw", demo, ["vggface2"])
    times["demo_data_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    result = run_clean_data(str(work / "raw"), "vggface2", str(work / "refined"), cfg)
    times["refine_s"] = round(time.perf_counter() - t, 1)
    truth_path = work / "raw" / "ground_truth.json"
    score = score_stage2(result.stage2.uri, str(truth_path))
    truth = json.loads(truth_path.read_text())
    manifest = result.stage2.manifest.to_dict()
    stage2 = {k: v for k, v in manifest["stage2"].items() if k != "config"}
    if args.keep_embeddings:
        save_replay(result, truth, cfg.denoise, work.parent / f"{work.name}.npz")
    return {"demo": dataclasses.asdict(demo), "times": times, "summary": summarise(score, truth, result),
            "stage2_score": score, "counts": manifest["counts"], "stage2": stage2,
            "rounds": rounds_run(work / "refined", stage2.get("loop")),
            "mistakes": mistakes(result, truth, cfg.denoise, stage2["angle_histogram"]["threshold_deg"],
                                 stage2["steps"].get("evaluation_overlap", {}))}


def save_replay(result, truth: dict, cfg, path: Path) -> None:
    """What the last round's stage 2 weighed, to replay its steps offline (benchmarks/
    replay_denoise.py): the final model's embeddings of the stage-1 faces in row order, their
    labels and identities, the first round's model's embeddings of them, the evaluation faces'
    embeddings, and the truth per row (the person shown, whether the face is label noise), the
    overlap identities and duplicates."""
    import numpy as np

    from dataset import shards
    from pipelines.models import load_embedder
    from pipelines.stage2_ray import embedded_faces, evaluation_faces

    embedded, _ = embedded_faces(result.stage1, result.bootstrap_checkpoint, cfg, "")
    emb = np.concatenate([block for _, block in embedded.embeddings.blocks()])
    keys = [_norm_key(k) for uri in result.stage1.shard_uris()
            for k in shards.read_table(uri, ["key"]).column("key").to_pylist()]
    by_key = {r["key"]: r for r in truth["images"]}
    first = json.loads((Path(result.stage1.uri).parent / "bootstrap.json").read_text())["checkpoint"]
    round1 = emb
    if first != result.bootstrap_checkpoint:  # more than one round: the first model's view too
        embedded1, _ = embedded_faces(result.stage1, first, cfg, "")
        round1 = np.concatenate([block for _, block in embedded1.embeddings.blocks()])
    faces, eval_people = evaluation_faces(result.stage1)
    eval_emb = load_embedder(result.bootstrap_checkpoint).embedder(faces, True) if len(faces) else np.zeros((0, emb.shape[1]))
    np.savez_compressed(path, embeddings=emb.astype(np.float32), round1_embeddings=round1.astype(np.float32),
                        groups=embedded.groups,
                        identities=np.asarray(embedded.identities, str), eval_embeddings=np.asarray(eval_emb, np.float32),
                        eval_people=eval_people,
                        person=np.asarray([by_key[k]["true_identity"] for k in keys], str),
                        noise=np.asarray(["label_noise" in by_key[k]["defects"] for k in keys]),
                        overlap=np.asarray(truth["eval_overlap_identities"], str),
                        duplicates=np.asarray(truth["duplicate_identities"], str).reshape(-1, 2))


def rounds_run(refined: Path, loop: dict | None = None) -> dict:
    """How many rounds ran, and what each intermediate round found. `loop` (the stage-2
    manifest's record of the loop's choices, when the code writes one) adds how each round
    was decided (the share that decided it, and by which rule) and the bootstrap lengths."""
    earlier = []
    decided = {r["round"]: r for r in (loop or {}).get("rounds", [])}
    for folder in sorted(refined.glob("round*"), key=lambda p: int(p.name[5:])):
        m = json.loads((folder / "manifest.json").read_text())["stage2"]
        intra = m["steps"]["intra_class"]
        dropped = sum(intra["dropped"].values())
        n = int(folder.name[5:])
        earlier.append({"round": n, "threshold_deg": intra["max_angle"],
                        "threshold_from": intra["max_angle_from"], "dropped": dropped,
                        "judged_faces": intra["judged_faces"],
                        "share_found": round(dropped / max(1, intra["judged_faces"]), 4),
                        # which identities it merged: they are one class to the next model
                        "merges": [mg["identities"] for mg in m.get("merges", [])],
                        **({"decision": decided[n]} if n in decided else {})})
    last = [r for n, r in decided.items() if n > len(earlier)]  # the round that stopped the loop
    return {"rounds": len(earlier) + 1, "earlier_rounds": earlier, **({"stopped_by": last[0]} if last else {}),
            **({"bootstrap_steps": [b["steps"] for b in loop["bootstraps"]]} if loop else {})}


def summarise(score: dict, truth: dict, result) -> dict:
    noise, dup, overlap = score["label_noise"], score["duplicate_identities"], score["overlap_identities"]
    got = outcomes(result.stage2.uri)
    kept_ids = {r["filed_identity"] for r in truth["images"] if got.get(r["key"]) == "kept"}
    return {"precision": noise["precision"], "recall": noise["recall"],
            "noise_reached": noise["reached_stage2"], "noise_caught": noise["caught"], "flagged": noise["flagged"],
            "false_merges": dup["other_merges"], "false_merges_of_one_person": dup["other_merges_of_one_person"],
            "missed_merges": len(dup["truth"]) - len(dup["merged"]),
            "overlap_kept": sorted(set(overlap["truth"]) & kept_ids),
            "overlap_faces_kept": overlap["faces_kept"], "wrongly_removed": overlap["wrongly_removed"],
            "clean_kept": score["clean_kept"]}


def mistakes(result, truth: dict, denoise_cfg, threshold: float, overlap_step: dict) -> dict:
    """Where stage 2 went wrong, per identity: mislabelled faces kept (recall), clean faces
    dropped as noise (precision), with each one's angle to its identity's centre as the final
    model judged it, and which person the identity's kept faces mostly show (an identity whose
    own person was outnumbered in its folder keeps a look-alike's faces)."""
    from cleaning.denoise import EmbeddedSet
    from dataset import shards
    from pipelines.stage2_ray import denoise_steps, embedded_faces
    from pipelines.training import checkpoint

    # The final judgement's angles again (the manifest keeps only their histogram): the same
    # step on the same cached embeddings, so the threshold must come out as stage 2's. After
    # a second round run_refine judges against the embeddings' centres (the model's classes
    # are round 1's labels), as here.
    stage1, model = result.stage1, result.bootstrap_checkpoint
    later_round = Path(stage1.uri).parent.joinpath("round1").exists()
    centres = (checkpoint.read_all_centres(model) if denoise_cfg.use_model_centres and not later_round else None)
    embedded, _ = embedded_faces(stage1, model, denoise_cfg, "")
    judged = EmbeddedSet(embedded.embeddings, embedded.groups.copy(), embedded.identities)
    step = denoise_steps(denoise_cfg, None, centres)[0]  # the intra-class step as stage 2 built it
    step(judged)
    keys = [_norm_key(k) for uri in stage1.shard_uris()
            for k in shards.read_table(uri, ["key"]).column("key").to_pylist()]
    angle = dict(zip(keys, judged.angles.tolist()))
    got = outcomes(result.stage2.uri)
    by_key = {r["key"]: r for r in truth["images"]}
    per_id: dict[str, dict] = defaultdict(lambda: {"faces": 0, "noise": 0, "noise_kept": 0, "clean_dropped": 0,
                                                   "kept_people": Counter(), "noise_kept_from": Counter(),
                                                   "noise_kept_angles": [], "clean_dropped_angles": []})
    for key in keys:
        rec = by_key.get(key)
        if rec is None:
            continue
        ident, outcome = per_id[rec["filed_identity"]], got.get(key, "missing")
        is_noise = "label_noise" in rec["defects"]
        ident["faces"] += 1
        ident["noise"] += is_noise
        a = round(angle.get(key, float("nan")), 1)
        if outcome == "kept":
            ident["kept_people"][rec["true_identity"]] += 1
            if is_noise:
                ident["noise_kept"] += 1
                ident["noise_kept_from"][rec["true_identity"]] += 1
                ident["noise_kept_angles"].append(a)
        elif outcome == NOISE_REASON and not is_noise:
            ident["clean_dropped"] += 1
            ident["clean_dropped_angles"].append(a)
    overlap, dups = set(truth["eval_overlap_identities"]), {i for p in truth["duplicate_identities"] for i in p}
    same_person = {frozenset(p) for p in truth["duplicate_identities"]}
    rows = []
    for name, ident in sorted(per_id.items()):
        if not (ident["noise_kept"] or ident["clean_dropped"] or name in overlap):
            continue
        top = ident["kept_people"].most_common(1)
        rows.append({"identity": name, "faces": ident["faces"], "noise": ident["noise"],
                     "noise_kept": ident["noise_kept"], "clean_dropped": ident["clean_dropped"],
                     "kept": sum(ident["kept_people"].values()),
                     "kept_mostly": top[0][0] if top else None,
                     "kept_mostly_share": round(top[0][1] / sum(ident["kept_people"].values()), 3) if top else 0,
                     "taken_over": bool(top) and top[0][0] != name and frozenset((name, top[0][0])) not in same_person,
                     "noise_kept_from": dict(ident["noise_kept_from"].most_common()),
                     "noise_kept_angles": sorted(ident["noise_kept_angles"]),
                     "clean_dropped_angles": sorted(ident["clean_dropped_angles"]),
                     "overlap": name in overlap, "duplicate": name in dups})
    rows.sort(key=lambda r: -(r["noise_kept"] + r["clean_dropped"]))
    evidence = overlap_evidence(result, judged, sorted(overlap), overlap_step)
    kept_angles = [a for r in rows for a in r["noise_kept_angles"]]
    return {"recomputed_threshold_deg": round(float(step.threshold), 2), "manifest_threshold_deg": threshold,
            "noise_kept_total": sum(r["noise_kept"] for r in rows),
            "noise_kept_in_taken_over_identities": sum(r["noise_kept"] for r in rows if r["taken_over"]),
            "noise_kept_within_5deg_of_threshold": sum(1 for a in kept_angles if a >= threshold - 5),
            "noise_kept_angle_quartiles": [round(q, 1) for q in (statistics.quantiles(kept_angles, n=4)
                                                                 if len(kept_angles) >= 2 else kept_angles)],
            "identities": rows, "overlap_evidence": evidence}


def overlap_evidence(result, judged, overlap_ids: list[str], overlap_step: dict) -> dict:
    """Per evaluation-overlap identity, the evidence EvaluationOverlap weighs (the manifest
    keeps only the identities it found): of the evaluation faces nearest its centre, how many
    lie within the step's angle, how many pass the ratio test, both (>= min_faces removes it).
    Approximate: centres of the faces kept by the intra-class step, before merges."""
    import numpy as np
    import torch

    from cleaning.denoise import group_centres, nearest
    from pipelines.stage2_ray import evaluation_faces
    from pipelines.models import load_embedder

    faces, _ = evaluation_faces(result.stage1)
    if not len(faces) or not overlap_step:
        return {}
    eval_emb = load_embedder(result.bootstrap_checkpoint).embedder(faces, True)
    num = int(judged.groups.max()) + 1
    centres, counts = group_centres(judged.embeddings, torch.from_numpy(judged.groups.astype(np.int64)),
                                    torch.from_numpy(judged.kept), num)
    present = np.flatnonzero(counts.numpy() > 0)
    closest, angle, second = nearest(eval_emb, centres.numpy()[present], second=True)
    group_of = dict(zip(judged.identities.tolist(), judged.groups.tolist()))
    max_angle, max_ratio = overlap_step["max_angle"], overlap_step["max_ratio"]
    out = {}
    for name in overlap_ids:
        hit = np.flatnonzero(present[closest] == group_of.get(name, -1))
        ratio = angle[hit] / np.maximum(second[hit], 1e-6)
        out[name] = {"nearest": len(hit), "within_angle": int((angle[hit] <= max_angle).sum()),
                     "pass_ratio": int((ratio <= max_ratio).sum()),
                     "counted": int(((angle[hit] <= max_angle) & (ratio <= max_ratio)).sum()),
                     # the 8 faces that speak most for it (lowest ratio): angle, ratio
                     "best_faces": [[round(float(angle[hit][i]), 1), round(float(ratio[i]), 2)]
                                    for i in np.argsort(ratio)[:8]],
                     "found_by_stage2": name in overlap_step.get("identities_by_embedding", [])}
    return out



# -- the sweep and its table ---------------------------------------------------------------

def planned(args) -> list[tuple]:
    seeds = args.seeds or unseen_seeds(args.seed_count)
    return [(args.identities, args.images_per_identity, level, kind, seed)
            for level in args.levels for seed in seeds for kind in args.kinds]


def sweep(args, command: str) -> None:
    work = Path(args.work)
    for identities, per_identity, level, kind, seed in planned(args):
        name = case_name(identities, per_identity, level, kind, seed)
        record_path = work / f"{name}.json"
        if record_path.exists():
            before = json.loads(record_path.read_text())
            if before.get("overrides", []) != args.set:  # case names do not carry the overrides
                sys.exit(f"{record_path} was made with --set {before.get('overrides')}: give this sweep its own --work")
            if "error" not in before:
                print(f"{name}: done before, skipped", flush=True)
                continue
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record = {"identities": identities, "images_per_identity": per_identity, "label_noise": level,
                  "kind": kind, "seed": seed, "overrides": args.set, "command": command, "code": source_commit()}
        started = time.perf_counter()
        try:
            record.update(run_case(args, level, kind, seed, work / name))
        except Exception:  # noqa: BLE001 - a crash on one draw is a finding: recorded, the sweep goes on
            record["error"] = traceback.format_exc()
        record["wall_s"] = round(time.perf_counter() - started, 1)
        record_path.write_text(json.dumps(record, indent=1))
        if "error" not in record:
            shutil.rmtree(work / name, ignore_errors=True)
        s = record.get("summary", {})
        print(f"{name}: {record['wall_s']:.0f} s, " + (f"precision {s['precision']:.4f} recall {s['recall']:.4f} "
              f"false merges {s['false_merges']} missed merges {s['missed_merges']} overlap kept "
              f"{s['overlap_kept']}" if s else "FAILED"), flush=True)


def finished_cases(args) -> list[dict]:
    cases = []
    for path in sorted(Path(args.work).glob("*x*/*.json")):
        case = json.loads(path.read_text())
        if case.get("overrides", []) != args.set:
            continue  # another configuration's sweep shares the folder
        cases.append(case)
    return cases


def _spread(values: list[tuple], worst: str) -> dict:
    """min / median / max of (value, seed) pairs, with the seed of the worst value."""
    nums = [v for v, _ in values]
    pick = min if worst == "min" else max
    worst_value = pick(nums)
    return {"min": min(nums), "median": statistics.median(nums), "max": max(nums), "worst": worst_value,
            "worst_seeds": sorted(s for v, s in values if v == worst_value)}


def tabulate(cases: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cases:
        if "summary" in c:
            groups[(c["identities"], c["images_per_identity"], c["label_noise"], c["kind"])].append(c)
    rows = []
    for (identities, per_identity, level, kind), group in sorted(groups.items()):
        def values(f, group=group):
            return [(f(c["summary"]), c["seed"]) for c in group]
        rows.append({
            "identities": identities, "images_per_identity": per_identity, "label_noise": level, "kind": kind,
            "seeds": sorted(c["seed"] for c in group),
            "precision": _spread(values(lambda s: s["precision"]), "min"),
            "recall": _spread(values(lambda s: s["recall"]), "min"),
            "false_merges": _spread(values(lambda s: s["false_merges"]), "max"),
            # Of them, merges whose identities' kept faces all show one person (an identity whose
            # own person was lost keeps a look-alike's faces, joined to the look-alike's identity):
            # no label error in the merged class, but the truth asked for no merge.
            "false_merges_of_one_person": _spread(values(lambda s: s.get("false_merges_of_one_person", 0)), "max"),
            "missed_merges": _spread(values(lambda s: s["missed_merges"]), "max"),
            "overlap_kept": _spread(values(lambda s: len(s["overlap_kept"])), "max"),
            # the evaluation persons' faces kept under any identity, and identities wrongly removed
            # as evaluation people (records from before they were counted: -1, shown as "-")
            "overlap_faces_kept": _spread(values(lambda s: s.get("overlap_faces_kept", -1)), "max"),
            "wrongly_removed": _spread(values(lambda s: len(s["wrongly_removed"]) if "wrongly_removed" in s else -1),
                                       "max"),
            "one_round_seeds": sorted(c["seed"] for c in group if c["rounds"]["rounds"] == 1),
        })
    return rows


def meets_bar(row: dict) -> bool:
    """Issue 29's bar: minimum precision and recall >= 0.95, no false merge, every duplicate
    merged, no evaluation-overlap identity kept, on every seed."""
    return (row["precision"]["min"] >= 0.95 and row["recall"]["min"] >= 0.95 and row["false_merges"]["max"] == 0
            and row["missed_merges"]["max"] == 0 and row["overlap_kept"]["max"] == 0)


def _case_row(c: dict) -> str:
    if "summary" not in c:
        return (f"| {c['identities']}x{c['images_per_identity']} | {c['label_noise']:g} | {c['kind']} | {c['seed']} "
                f"| failed: {c['error'].strip().splitlines()[-1][:80]} | | | | | | | | | |")
    s, m = c["summary"], c["mistakes"]
    same_person = {frozenset(p) for p in c["stage2_score"]["duplicate_identities"]["truth"]}
    # A duplicate identity's faces show the person it duplicates: not a take-over.
    taken = [r["identity"] for r in m["identities"]
             if r["taken_over"] and frozenset((r["identity"], r["kept_mostly"])) not in same_person]
    rows = {r["identity"]: r for r in m["identities"]}
    # An overlap identity whose kept faces are all a look-alike's leaks no evaluation person.
    overlap = [f"{i} ({rows[i]['kept'] - rows[i]['noise_kept']} own)" if i in rows else i for i in s["overlap_kept"]]
    rounds = c["rounds"]
    shares = ", ".join(_decided_share(r) for r in rounds["earlier_rounds"]) or "-"
    steps = "/".join(map(str, rounds.get("bootstrap_steps", []))) or "-"
    return (f"| {c['identities']}x{c['images_per_identity']} | {c['label_noise']:g} | {c['kind']} | {c['seed']} "
            f"| {s['precision']:.4f} | {s['recall']:.4f} ({s['noise_reached'] - s['noise_caught']} kept) "
            f"| {s['false_merges']}" + (f" ({s['false_merges_of_one_person']} of one person)"
                                        if s['false_merges_of_one_person'] else "")
            + f" | {s['missed_merges']} | {', '.join(overlap) or '-'} "
            f"| {c['stage2']['angle_histogram']['threshold_deg']:.1f} | {rounds['rounds']} ({shares}) | {steps} "
            f"| {', '.join(taken) or '-'} | {c['wall_s']:.0f} |")


def _decided_share(r: dict) -> str:
    """An earlier round's share found; where the share beyond Otsu's split decided it (the
    threshold came from a fallback rule: cleaning/denoise.round_decision), that share too."""
    d = r.get("decision")
    if d is None:
        return f"{r['share_found']:.2f}"
    if "Otsu's split" in d["decided_by"]:
        return f"{d['share_found']:.2f}, Otsu {d['share_beyond_otsu']:.2f}"
    return f"{d['share_found']:.2f}"


def _one_person(row: dict) -> str:
    most = row.get("false_merges_of_one_person", {}).get("max", 0)
    return f"; of one person: at most {most:g} a seed" if most else ""


def _cell(spread: dict, digits: int) -> str:
    f = (lambda v: f"{v:.{digits}f}") if digits else (lambda v: f"{v:g}")
    return f"{f(spread['min'])} / {f(spread['median'])} / {f(spread['max'])}"


def _worst(spread: dict, digits: int) -> str:
    if not digits and spread["worst"] == 0:
        return "0"  # no seed went wrong: no seeds to name
    v = f"{spread['worst']:.{digits}f}" if digits else f"{spread['worst']:g}"
    return f"{v} (seed {', '.join(map(str, spread['worst_seeds']))})"


def report(args, command: str) -> None:
    cases = finished_cases(args)
    rows = tabulate(cases)
    done = {(c["identities"], c["images_per_identity"], c["label_noise"], c["kind"], c["seed"])
            for c in cases if "summary" in c}
    missing = [p for p in planned(args) if p not in done]
    commands = sorted({c["command"] for c in cases})
    codes = sorted({c.get("code", "unknown") for c in cases})
    import torch

    record = {"report_command": command, "sweep_commands": commands, "code": codes,
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, {platform.python_version()}, "
                         f"torch {torch.__version__}",
              "overrides": args.set, "note": args.note, "planned": [list(p) for p in planned(args)],
              "missing": [list(p) for p in missing], "table": rows,
              "cases": [{k: c[k] for k in ("identities", "images_per_identity", "label_noise", "kind", "seed",
                                           "summary", "rounds", "times", "wall_s") if k in c}
                        | {"threshold_deg": c["stage2"]["angle_histogram"]["threshold_deg"]} if "summary" in c
                        else {k: c[k] for k in ("identities", "images_per_identity", "label_noise", "kind", "seed",
                                                "error")}
                        for c in cases]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.results_name}.json").write_text(json.dumps(record, indent=1))
    status = (f"**Partial**: {len(done & set(planned(args)))} of the {len(planned(args))} planned cases finished; "
              f"not run: {_describe(missing)}." if missing else
              f"All {len(planned(args))} planned cases finished.")
    md = ["# Refinement judged by its worst seed (issue 29)", "",
          *[f"Sweep command: `{c}`  " for c in commands],
          f"Table command: `{command}`  ",
          f"Code: {', '.join(codes)}; machine: {record['machine']}; config overrides: {', '.join(args.set) or 'none'}.",
          "", status, "", *([args.note, ""] if args.note else []),
          ("Each case: `arcface demo-data --identities I --images-per-identity P --seed S --set demo.label_noise=L` "
           "(confusable: `--set demo.noise_sources=3`, each mislabelled face shows one of the identity's 3 look-alikes; "
           "uniform: anyone), then `arcface clean-data --config configs/demo-train.toml`, scored by "
           "cleaning/synthetic/score.py. Precision and recall of label noise over the faces that reached stage 2; "
           "false merges: merged label groups that are not an injected duplicate pair; missed merges: injected "
           "duplicate pairs left apart; overlap kept: evaluation-overlap identities with kept faces; their faces "
           "kept: faces of evaluation-overlap persons kept under any identity (the leak itself); wrongly removed: "
           "training identities dropped as evaluation people they are not. "
           "Cells: min / median / max over seeds; worst: the worst value and the seeds that gave it."), "",
          ("| size | noise | kind | seeds | precision | worst precision | recall | worst recall | false merges "
           "| worst | missed merges | worst | overlap kept | worst | their faces kept (worst) "
           "| wrongly removed (worst) | one round only | issue bar |"),
          "|---|---:|---|---:|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['identities']}x{r['images_per_identity']} | {r['label_noise']:g} | {r['kind']} "
                  f"| {len(r['seeds'])} | {_cell(r['precision'], 4)} | {_worst(r['precision'], 4)} "
                  f"| {_cell(r['recall'], 4)} | {_worst(r['recall'], 4)} | {_cell(r['false_merges'], 0)} "
                  f"| {_worst(r['false_merges'], 0)}{_one_person(r)} | {_cell(r['missed_merges'], 0)} | {_worst(r['missed_merges'], 0)} "
                  f"| {_cell(r['overlap_kept'], 0)} | {_worst(r['overlap_kept'], 0)} "
                  f"| {_worst(r['overlap_faces_kept'], 0) if r['overlap_faces_kept']['min'] >= 0 else '-'} "
                  f"| {_worst(r['wrongly_removed'], 0) if r['wrongly_removed']['min'] >= 0 else '-'} "
                  f"| {', '.join(f'seed {x}' for x in r['one_round_seeds']) or '-'} "
                  f"| {'met' if meets_bar(r) else 'not met'} |")
    if args.compare:
        md += ["", *compare(rows, Path(args.compare))]
    md += ["", "## Every case", "",
           ("Threshold: stage 2's intra-class angle (deg); rounds: how many ran (the share of judged faces each "
            "earlier round found mislabelled, which decided another round; \"Otsu x\": its threshold came from a "
            "fallback rule, and the share x beyond Otsu's split decided); bootstrap steps: optimizer steps of each "
            "round's bootstrap model (denoise.bootstrap_min_steps); taken over: identities whose kept faces "
            "mostly show another person; overlap kept: each with how many of its kept faces show its own person "
            "(0: taken over by a look-alike, no evaluation person leaks)."), "",
           ("| size | noise | kind | seed | precision | recall (mislabelled kept) | false merges | missed merges "
            "| overlap kept | threshold | rounds | bootstrap steps | taken over | wall s |"),
           "|---|---:|---|---:|---:|---|---|---:|---|---:|---|---|---|---:|",
           *[_case_row(c) for c in sorted(cases, key=lambda c: (c["identities"], c["label_noise"], c["kind"],
                                                                  c["seed"]))], ""]
    (out / f"{args.results_name}.md").write_text("\n".join(md))
    print("\n".join(md))


def compare(rows: list[dict], earlier_path: Path) -> list[str]:
    """A before/after table against an earlier sweep's results JSON: per size, noise and
    kind, each sweep's worst (and median) over the seeds it ran, and the seeds both ran."""
    earlier = {(r["identities"], r["images_per_identity"], r["label_noise"], r["kind"]): r
               for r in json.loads(earlier_path.read_text())["table"]}
    md = [f"## Before / after (before: {earlier_path.name})", "",
          "Worst / median over seeds (before -> after); seeds: how many each ran (after: the sweep above, "
          "which may not have reached every seed).", "",
          "| size | noise | kind | seeds | recall | precision | false merges (max) | missed merges (max) "
          "| overlap kept (max) | worst recall seed | issue bar |",
          "|---|---:|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["identities"], r["images_per_identity"], r["label_noise"], r["kind"])
        b = earlier.get(key)
        if b is None:
            continue

        def both(field: str, digits: int, b=b, r=r) -> str:
            if digits:
                return (f"{b[field]['min']:.{digits}f} / {b[field]['median']:.{digits}f} -> "
                        f"{r[field]['min']:.{digits}f} / {r[field]['median']:.{digits}f}")
            return f"{b[field]['max']:g} -> {r[field]['max']:g}"
        md.append(f"| {key[0]}x{key[1]} | {key[2]:g} | {key[3]} | {len(b['seeds'])} -> {len(r['seeds'])} "
                  f"| {both('recall', 4)} | {both('precision', 4)} | {both('false_merges', 0)} "
                  f"| {both('missed_merges', 0)} | {both('overlap_kept', 0)} "
                  f"| {', '.join(map(str, b['recall']['worst_seeds']))} -> "
                  f"{', '.join(map(str, r['recall']['worst_seeds']))} "
                  f"| {'met' if meets_bar(b) else 'not met'} -> {'met' if meets_bar(r) else 'not met'} |")
    return md


def _describe(missing: list[tuple]) -> str:
    by_group: dict[tuple, list[int]] = defaultdict(list)
    for identities, per_identity, level, kind, seed in missing:
        by_group[(identities, per_identity, level, kind)].append(seed)
    return "; ".join(f"{i}x{p} noise {level:g} {kind} seeds {', '.join(map(str, seeds))}"
                     for (i, p, level, kind), seeds in by_group.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.4, 0.45, 0.5],
                    help="label-noise shares (demo.label_noise), in the order they run")
    ap.add_argument("--kinds", nargs="+", choices=sorted(NOISE_SOURCES), default=["uniform", "confusable"])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="demo seeds (default: --seed-count of them)")
    ap.add_argument("--seed-count", type=int, default=10,
                    help=f"the first N seeds none of the committed sweeps or tests used (those: {sorted(TUNED_SEEDS)})")
    ap.add_argument("--identities", type=int, default=50)
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every case (demo.*, denoise.*, train.*), as `arcface --set`")
    ap.add_argument("--work", default="/tmp/refinement_seed_sweep",
                    help="one JSON per finished case (resume), and the running case's data; one folder per --set")
    ap.add_argument("--results-name", default="refinement_seed_sweep", help="file stem under --out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--keep-embeddings", action="store_true",
                    help="also write <case>.npz: the last round's embeddings and the truth per face, for "
                         "benchmarks/replay_denoise.py")
    ap.add_argument("--report-only", action="store_true", help="only tabulate the finished cases under --work")
    ap.add_argument("--note", default="", help="a paragraph for the table's page: why this sweep, what it left out")
    ap.add_argument("--compare", default="", help="an earlier sweep's results JSON: adds a before/after table")
    args = ap.parse_args()
    command = "python benchmarks/sweep_refinement_seeds.py " + shlex.join(sys.argv[1:])
    if not args.report_only:
        sweep(args, command)
    report(args, command)


if __name__ == "__main__":
    main()
