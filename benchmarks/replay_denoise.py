"""Replay stage 2's de-noise steps on the embeddings a refinement sweep kept, scored against
the truth: a change to the rules measured on every kept case in seconds, not a sweep's hour.

    .venv/bin/python benchmarks/sweep_refinement_seeds.py ... --keep-embeddings --work DIR
    .venv/bin/python benchmarks/replay_denoise.py DIR [--set denoise.KEY=VALUE ...]

An earlier commit's rules on the same embeddings (its code on the path, this script):
    git worktree add /tmp/earlier COMMIT && cp benchmarks/replay_denoise.py /tmp/earlier/benchmarks/
    PYTHONPATH=/tmp/earlier .venv/bin/python /tmp/earlier/benchmarks/replay_denoise.py DIR

Beyond the sweep's figures it counts the evaluation persons' faces kept under any identity,
the identities wrongly removed as evaluation people, and the folders with no majority (their
own person no more than one other person's faces: a tie a label-reading rule cannot break)
with the false merges that touch one. A case kept before the sweep saved `eval_people` has
them made again from its demo config (demo_eval_people).

What it replays is the last round only: the steps of pipelines/stage2_ray.run_stage2 on the
final model's embeddings (<case>.npz, written by the sweep). A rule that changes an earlier
round changes the model the last round embeds with, which only a sweep measures; so a rule
is chosen here and confirmed by the sweep.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cleaning.denoise import Embeddings, EmbeddedSet
from pipelines.config import load_config

try:
    from pipelines.stage2_ray import denoise_steps
except ImportError:  # an earlier commit's code, before the steps had one home: as run_stage2 built them
    def denoise_steps(cfg, eval_emb):
        from cleaning.denoise import EvaluationOverlap, IntraClassOutliers, MergeIdentities, SmallIdentities

        return [IntraClassOutliers(cfg.max_angle, cfg.min_images_to_judge, nearer_another=cfg.nearer_another_identity,
                                   same_person_angle=cfg.merge_same_person_angle),
                MergeIdentities(cfg.merge_max_angle, same_person_angle=cfg.merge_same_person_angle),
                EvaluationOverlap(eval_emb, cfg.overlap_max_angle, cfg.overlap_min_faces),
                SmallIdentities(cfg.min_images_per_identity)]

NOISE_REASON = "intra_class/far_from_identity_centre"
OVERLAP_REASON = "evaluation_overlap/overlaps_evaluation_set"


def replay(case: Path, cfg) -> dict:
    """The steps of run_stage2 (last round: overlap dropped) on one case, and its score."""
    z = np.load(case)
    data = EmbeddedSet(Embeddings(z["embeddings"]), z["groups"].astype(np.int64), z["identities"].astype(object))
    eval_emb = z["eval_embeddings"] if len(z["eval_embeddings"]) else None
    people = {}
    if "eval_people" in inspect.signature(denoise_steps).parameters:  # not in an earlier commit's steps
        people["eval_people"] = z["eval_people"] if "eval_people" in z.files else demo_eval_people(case)
    for step in denoise_steps(cfg, eval_emb, **people):
        step(data)
    return score(data, z)


def demo_eval_people(case: Path) -> np.ndarray:
    """The evaluation people of a case kept before the sweep saved them: the demo's evaluation
    sets made again from the case's demo config (<case>.json; the generator is deterministic),
    grouped as stage 2 groups them. Checked against the kept evaluation embeddings' count."""
    import json

    from cleaning.formats.insightface_bin import loads_pairs
    from cleaning.synthetic.demo import build_eval_pairs, make_plan
    from cleaning.synthetic.demo_config import DemoConfig
    from pipelines.evaluate import FaceSet, PairSet, decode_aligned
    from pipelines.stage2_ray import evaluation_people

    demo = DemoConfig(**json.loads(case.with_suffix(".json").read_text())["demo"])
    pairs_bin, meta = build_eval_pairs(make_plan(demo))
    images, issame = loads_pairs(pairs_bin)
    faces, people = evaluation_people(
        [PairSet("pairs", "pairs", decode_aligned(images), np.asarray(issame, bool))],
        [FaceSet("faces", "faces", decode_aligned([f for _, f in meta["faces"]]),
                 np.asarray([p for p, _ in meta["faces"]]))])
    if len(faces) != len(np.load(case)["eval_embeddings"]):
        raise ValueError(f"{case}: {len(faces)} evaluation faces made again, the case kept another count")
    return people


def score(data: EmbeddedSet, z) -> dict:
    """As cleaning/synthetic/score.score_stage2 scores a written dataset."""
    noise, kept, names = z["noise"], data.kept, data.identities.astype(str)
    flagged = data.reasons == NOISE_REASON
    caught = int((flagged & noise).sum())
    labels = {}
    for name, g in zip(names[kept], data.groups[kept]):
        labels[name] = int(g)
    duplicates = [tuple(p) for p in z["duplicates"]]
    merged = [p for p in duplicates if all(x in labels for x in p) and labels[p[0]] == labels[p[1]]]
    members = Counter(labels.values())
    merged_labels = {labels[p[0]] for p in merged}
    other = [g for g, n in members.items() if n > 1 and g not in merged_labels]
    person = z["person"]
    one_person = sum(1 for g in other if len({Counter(person[kept & (names == name)]).most_common(1)[0][0]
                                               for name, label in labels.items() if label == g}) == 1)
    overlap = set(z["overlap"].tolist())
    # Folders whose own person does not outnumber one other person among their stage-1 faces
    # (a tie or fewer): no rule that reads labels can tell which is the folder's person.
    own_person = {name: name for name in np.unique(names)}
    own_person.update({a: b for a, b in duplicates} | {b: b for a, b in duplicates})  # an alias shows its original
    no_majority = set()
    for name in np.unique(names):
        shown = Counter(person[names == name])
        own = shown.pop(own_person[name], 0)
        if own <= max(shown.values(), default=-1):
            no_majority.add(name)
    merged_away = {g: {name for name, label in labels.items() if label == g} for g in other}
    return {"precision": caught / max(1, int(flagged.sum())), "recall": caught / max(1, int(noise.sum())),
            "false_merges": len(other), "false_merges_of_one_person": one_person,
            "no_majority_folders": len(no_majority),
            "false_merges_with_one": sum(1 for g in other if merged_away[g] & no_majority),
            "missed_merges": len(duplicates) - len(merged),
            "overlap_kept": sorted(overlap & set(names[kept].tolist())),
            # an evaluation person's faces kept under any identity (a leak the names above miss)
            "overlap_faces_kept": int((kept & np.isin(person, list(overlap))).sum()),
            # identities dropped as evaluation people that are not (a training identity lost)
            "wrongly_removed": sorted(set(names[data.reasons == OVERLAP_REASON].tolist()) - overlap)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", help="a sweep's --work folder (its cases' .npz files)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "demo-train.toml", overrides=args.set).denoise
    worst = {"precision": 1.0, "recall": 1.0, "false_merges": 0, "missed_merges": 0, "overlap_kept": 0}
    cases = sorted(Path(args.work).glob("*x*/*.npz"))
    failing, totals, groups = 0, Counter(), defaultdict(list)
    for case in cases:
        s = replay(case, cfg)
        bad = (s["precision"] < 0.95 or s["recall"] < 0.95 or s["false_merges"] or s["missed_merges"]
               or s["overlap_kept"])
        print(f"{'FAIL' if bad else 'ok  '} {case.parent.name}/{case.stem}: precision {s['precision']:.3f} recall "
              f"{s['recall']:.3f} false merges {s['false_merges']} missed merges {s['missed_merges']} "
              f"overlap kept {s['overlap_kept']} (their faces kept {s['overlap_faces_kept']}) "
              f"wrongly removed {s['wrongly_removed']}")
        failing += bool(bad)
        groups[f"{case.parent.name} {case.stem.rsplit('_seed', 1)[0]}"].append({**s, "bad": bool(bad)})
        totals.update(false_merges=s["false_merges"], missed_merges=s["missed_merges"],
                      overlap_kept=len(s["overlap_kept"]), overlap_faces_kept=s["overlap_faces_kept"],
                      no_majority_folders=s["no_majority_folders"], false_merges_with_one=s["false_merges_with_one"],
                      wrongly_removed=len(s["wrongly_removed"]))
        for k in ("precision", "recall"):
            worst[k] = min(worst[k], s[k])
        for k in ("false_merges", "missed_merges"):
            worst[k] = max(worst[k], s[k])
        worst["overlap_kept"] = max(worst["overlap_kept"], len(s["overlap_kept"]))
    print("\n| case group | cases | failing the bar | worst precision | worst recall | false merges (of one person) "
          "| missed merges | overlap kept |\n|---|---:|---:|---:|---:|---|---:|---:|")
    for key, rows in sorted(groups.items()):
        print(f"| {key} | {len(rows)} | {sum(r['bad'] for r in rows)} | {min(r['precision'] for r in rows):.4f} "
              f"| {min(r['recall'] for r in rows):.4f} | {sum(r['false_merges'] for r in rows)} "
              f"({sum(r['false_merges_of_one_person'] for r in rows)}) | {sum(r['missed_merges'] for r in rows)} "
              f"| {sum(len(r['overlap_kept']) for r in rows)} |")
    print(f"worst of {len(cases)}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in worst.items())
          + f"; {failing} failing the bar; totals: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))


if __name__ == "__main__":
    main()
