"""Score a refinement run against the demo's ground truth: per-defect precision and recall.

For each defect stage 1 is meant to catch, the reasons that count as catching it. A
defect is *recalled* when its image is rejected with one of those reasons; a reason's
*precision* is the share of its rejects that really carry a defect it stands for.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter, defaultdict

from dataset import shards, storage
from dataset.refined import RefinedDataset

EXPECTED = {
    "undecodable": {"decode/undecodable", "decode/truncated"},
    "zero_byte": {"decode/empty_file"},
    "no_face": {"detect/no_face", "det_score/low_detection_score"},
    "tiny_face": {"face_size/face_too_small"},
    "blurred": {"blur/too_blurry"},
    "exact_duplicate": {"exact_duplicate/exact_duplicate"},
    "near_duplicate": {"near_duplicate/near_duplicate"},
    "bad_annotation": {"read/malformed_annotation", "source_landmarks/landmarks_outside_image"},
    "malformed_row": {"read/malformed_row", "read/invalid_base64", "read/unsafe_identity"},
}


def _norm_key(key: str) -> str:
    stem, ext = posixpath.splitext(key)
    return stem if ext.lower() in (".jpg", ".jpeg", ".png") else key


def outcomes(out: str) -> dict[str, str]:
    """key -> 'kept' or 'stage/reason' for every record of a refined dataset."""
    ds = RefinedDataset.open(out)
    result = {}
    for uri in ds.shard_uris():
        for key in shards.read_table(uri, ["key"]).column("key").to_pylist():
            result[_norm_key(key)] = "kept"
    for uri in ds.reject_uris():
        t = shards.read_table(uri, ["key", "stage", "reason"])
        for key, stage, reason in zip(*(t.column(c).to_pylist() for c in ("key", "stage", "reason"))):
            result[_norm_key(key)] = f"{stage}/{reason}"
    return result


def score_stage1(out: str, truth_path: str) -> dict:
    truth = json.loads(storage.read_bytes(truth_path))
    got = outcomes(out)
    confusion: dict[str, Counter] = defaultdict(Counter)
    for rec in truth["images"]:
        kind = rec["defects"][0] if rec["defects"] else "clean"
        confusion[kind][got.get(rec["key"], "missing")] += 1
    per_defect = {}
    for defect, reasons in EXPECTED.items():
        total = sum(confusion[defect].values())
        if not total:
            continue
        caught = sum(n for r, n in confusion[defect].items() if r in reasons)
        flagged = sum(n for kind, c in confusion.items() for r, n in c.items() if r in reasons)
        per_defect[defect] = {"n": total, "recall": caught / total, "precision": caught / flagged if flagged else 0.0}
    clean = confusion["clean"]
    clean_total = sum(clean.values())
    return {
        "per_defect": per_defect,
        "clean_kept": clean["kept"] / clean_total if clean_total else 0.0,
        "label_noise_kept": confusion["label_noise"]["kept"] / max(1, sum(confusion["label_noise"].values())),
        "missing": sum(c["missing"] for c in confusion.values()),
        "confusion": {k: dict(v.most_common()) for k, v in sorted(confusion.items())},
    }


NOISE_REASON = "intra_class/far_from_identity_centre"
OVERLAP_REASONS = {"evaluation_overlap/overlaps_evaluation_set", "evaluation_overlap/named_in_evaluation_list"}


def score_stage2(out: str, truth_path: str) -> dict:
    """Stage 2 against the demo's truth: label noise found (precision, recall over the faces
    that reached stage 2), evaluation-overlap identities removed, duplicate identities merged,
    clean faces kept."""
    truth = json.loads(storage.read_bytes(truth_path))
    ds = RefinedDataset.open(out)
    manifest = ds.manifest.to_dict()
    got = outcomes(out)
    stage1_steps = {k.split("/")[0] for k in ds.parent().manifest.counts["by_reason"]}
    reached = [r for r in truth["images"] if got.get(r["key"], "missing").split("/")[0] not in stage1_steps]
    overlap_ids = set(truth["eval_overlap_identities"])
    noise = [r for r in reached if "label_noise" in r["defects"]]
    flagged = [r for r in reached if got.get(r["key"]) == NOISE_REASON]
    caught = [r for r in flagged if "label_noise" in r["defects"]]
    removed_ids = {r["filed_identity"] for r in reached if got.get(r["key"]) in OVERLAP_REASONS}
    kept_ids = {r["filed_identity"] for r in reached if got.get(r["key"]) == "kept"}
    labels = manifest["identity_to_label"]
    merged_pairs = [pair for pair in truth["duplicate_identities"]
                    if all(p in labels for p in pair) and labels[pair[0]] == labels[pair[1]]]
    label_sizes = Counter(labels.values())
    clean = [r for r in reached if not r["defects"] and r["filed_identity"] not in overlap_ids]
    # A merge the truth did not ask for can still join one person's kept faces: when an
    # identity's own person was outnumbered in its folder, what it kept is a look-alike's.
    kept_people: dict[str, Counter] = defaultdict(Counter)
    for r in reached:
        if got.get(r["key"]) == "kept":
            kept_people[r["filed_identity"]][r["true_identity"]] += 1
    members: dict[int, list[str]] = defaultdict(list)
    for ident, label in labels.items():
        members[label].append(ident)
    merged_pair_labels = {labels[pair[0]] for pair in merged_pairs}
    other = [ids for label, ids in members.items() if len(ids) > 1 and label not in merged_pair_labels]
    one_person = sum(1 for ids in other if len({kept_people[i].most_common(1)[0][0] for i in ids if kept_people[i]}) == 1)
    return {
        "label_noise": {"reached_stage2": len(noise), "flagged": len(flagged), "caught": len(caught),
                        "recall": len(caught) / max(1, len(noise)), "precision": len(caught) / max(1, len(flagged))},
        "overlap_identities": {"truth": sorted(overlap_ids), "removed": sorted(removed_ids),
                               "all_removed": overlap_ids <= removed_ids and not (overlap_ids & kept_ids),
                               # an evaluation person's faces kept under any identity: the leak itself
                               "faces_kept": sum(1 for r in reached if got.get(r["key"]) == "kept"
                                                 and r["true_identity"] in overlap_ids),
                               # training identities dropped as evaluation people they are not
                               "wrongly_removed": sorted(removed_ids - overlap_ids)},
        "duplicate_identities": {"truth": truth["duplicate_identities"], "merged": merged_pairs,
                                 "other_merges": sum(1 for n in label_sizes.values() if n > 1) - len(merged_pairs),
                                 "other_merges_of_one_person": one_person},
        "clean_kept": sum(got.get(r["key"]) == "kept" for r in clean) / max(1, len(clean)),
        "accounted": manifest["counts"]["read"] == manifest["counts"]["kept"] + manifest["counts"]["rejected"],
        "missing": sum(got.get(r["key"], "missing") == "missing" for r in truth["images"]),
    }
