"""A small synthetic IJB-B/IJB-C-style set in the official release layout, so the template
evaluation (pipelines/ijb.py) runs end to end on data we can make here.

Subjects are rendered identities of their own (not in the demo's training set). Each subject
has several templates; a template mixes still images (a media of their own) and the frames
of a video (one media id, several frames of one session: same pose family, small changes).
Every image is a loose crop with its five landmarks and a detector score. Verification
pairs: every same-subject template pair and about `impostor_ratio` times as many
different-subject pairs. 1:N: the first template of each subject forms gallery G1 (first half
of the subjects) or G2 (second half); every other template is a probe (mixed protocol).
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from cleaning.synthetic.render import random_identity, render


def write_ijb(out: str | Path, target: str = "IJBC", subjects: int = 24, templates_per_subject: int = 3,
              seed: int = 0, impostor_ratio: int = 8, size: int = 160) -> dict:
    target = target.upper()
    prefix = target.lower()
    out = Path(out)
    (out / "meta").mkdir(parents=True, exist_ok=True)
    (out / "loose_crop").mkdir(exist_ok=True)
    # The set's structure (templates, media, pairs) is the same for every seed; the seed
    # changes the people and the photos.
    rng = np.random.default_rng(41)
    people = [random_identity(np.random.default_rng([seed, 40, s])) for s in range(subjects)]
    faces, marks, template_subject = [], [], {}
    template, media, image = 0, 0, 0
    for s, person in enumerate(people):
        for _ in range(templates_per_subject):
            template += 1
            template_subject[template] = f"S{s:04d}"
            stills, video_frames = int(rng.integers(1, 3)), int(rng.integers(0, 4))
            for k in range(stills + video_frames):
                if k <= stills:
                    media += 1  # each still is a media of its own; the video's frames share one
                image += 1
                photo = render(person, np.random.default_rng([seed, 42, image]), size)
                name = f"{image}.jpg"
                cv2.imwrite(str(out / "loose_crop" / name), photo.image, [cv2.IMWRITE_JPEG_QUALITY, 90])
                faces.append(f"{name} {template} {media}")
                score = float(rng.uniform(0.6, 1.0))
                marks.append(name + " " + " ".join(f"{v:.2f}" for v in photo.landmarks.ravel()) + f" {score:.4f}")
    (out / "meta" / f"{prefix}_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (out / "meta" / f"{prefix}_name_5pts_score.txt").write_text("\n".join(marks) + "\n")
    by_subject: dict[str, list[int]] = {}
    for t, subj in template_subject.items():
        by_subject.setdefault(subj, []).append(t)
    genuine = [(a, b) for ts in by_subject.values() for i, a in enumerate(ts) for b in ts[i + 1:]]
    ids = list(template_subject)
    impostor = set()
    possible = len(ids) * (len(ids) - 1) // 2 - len(genuine)
    while len(impostor) < min(impostor_ratio * len(genuine), possible):
        a, b = (int(x) for x in rng.choice(ids, 2, replace=False))
        if template_subject[a] != template_subject[b]:
            impostor.add((min(a, b), max(a, b)))
    pairs = [f"{a} {b} 1" for a, b in genuine] + [f"{a} {b} 0" for a, b in sorted(impostor)]
    (out / "meta" / f"{prefix}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    half = subjects // 2
    gallery = {"G1": [], "G2": []}
    probes = []
    for s, (subj, ts) in enumerate(by_subject.items()):
        gallery["G1" if s < half else "G2"].append((ts[0], subj))
        probes += [(t, subj) for t in ts[1:]]
    for name, rows in (("gallery_G1", gallery["G1"]), ("gallery_G2", gallery["G2"]), ("probe_mixed", probes)):
        with open(out / "meta" / f"{prefix}_1N_{name}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"])
            writer.writerows([t, subj, ""] for t, subj in rows)
    return {"target": target, "path": str(out), "subjects": subjects, "templates": template, "images": image,
            "pairs": len(pairs), "genuine": len(genuine)}
