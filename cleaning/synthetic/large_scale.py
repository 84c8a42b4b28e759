"""Small synthetic releases of the large-scale benchmarks, each in its benchmark's layout, so
every adapter of pipelines/large_scale.py runs end to end on data we can make here.

Every face is a rendered identity of its own (cleaning/synthetic/render.py), aligned with its
exact landmarks to the ArcFace 112x112 template and written as an image file, as the aligned
test packs are distributed. The layouts (what the adapters read):

MegaFace Challenge 1 (insightface's aligned test pack):
    facescrub_images/<Identity>/<Identity>_<n>.png     probe identities
    megaface_images/<a>/<b>/<flickr id>_<n>.jpg        distractors
    facescrub_lst, megaface_lst                         relative paths, one a line
    facescrub_noises.txt, megaface_noises.txt           noisy images (refined protocol), '#' comments
    megaface_duplicates.txt                             distractors that show a probe identity
  The noise lists name real defects the writer plants: a FaceScrub image rendered from another
  identity (label noise), and distractors that show a probe identity (which would count as
  false accepts and wrong rank-1 answers).
Trillion-Pairs (ELFW-style identities + distractors):
    elfw/<identity>/<n>.jpg, distractors/<group>/<n>.jpg
    elfw_list.txt ("<relative path> <identity>"), distractor_list.txt (relative paths)
MFR-ALL style: images/<identity>/<n>.jpg (identity folders, all-to-all 1:1)
YouTube Faces:
    aligned_images_DB/<person>/<video>/aligned_detect_<video>.<frame>.jpg
    splits.txt: a header line, then "split, first video, second video, ..., same" per pair
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cleaning.align import align_face
from cleaning.synthetic.render import random_identity, render

PROTOCOLS = ("megaface", "trillion-pairs", "mfr-all", "ytf")


def _face(person, rng: np.random.Generator) -> np.ndarray:
    """One aligned 112x112 BGR face of `person`."""
    photo = render(person, rng, 160)
    rgb = cv2.cvtColor(photo.image, cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(align_face(rgb, photo.landmarks), cv2.COLOR_RGB2BGR)


def _write(path: Path, face: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), face):
        raise OSError(f"could not write {path}")


def _people(seed: int, tag: int, n: int):
    return [random_identity(np.random.default_rng([seed, tag, i])) for i in range(n)]


def write_megaface(out: str | Path, identities: int = 6, images_per_identity: int = 4, distractors: int = 60,
                   seed: int = 0) -> dict:
    out = Path(out)
    people = _people(seed, 1, identities)
    rng = np.random.default_rng([seed, 2])
    probes, noisy_probes = [], []
    for i, person in enumerate(people):
        name = f"Person_{i:03d}"
        for n in range(images_per_identity):
            rel = f"{name}/{name}_{n}.png"
            # label noise: one image of the first identity shows someone else (listed as noise)
            shown = people[(i + 1) % identities] if (i == 0 and n == images_per_identity - 1) else person
            _write(out / "facescrub_images" / rel, _face(shown, rng))
            probes.append(rel)
            if shown is not person:
                noisy_probes.append(rel)
    strangers = _people(seed, 3, distractors)
    distractor_paths, noisy, duplicates = [], [], []
    for d, person in enumerate(strangers):
        rel = f"{d % 3}/{d % 7}/{10_000 + d}@N0{d % 9}_{d}.jpg"
        if d == 0:  # a distractor that is a probe identity, named in the noise list
            person = people[1]
            noisy.append(rel)
        elif d == 1:  # and one named in the duplicates list
            person = people[2]
            duplicates.append(rel)
        _write(out / "megaface_images" / rel, _face(person, rng))
        distractor_paths.append(rel)
    (out / "facescrub_lst").write_text("\n".join(probes) + "\n")
    (out / "megaface_lst").write_text("\n".join(distractor_paths) + "\n")
    (out / "facescrub_noises.txt").write_text("# FaceScrub images whose label is wrong\n" + "\n".join(noisy_probes) + "\n")
    (out / "megaface_noises.txt").write_text("# distractors showing a FaceScrub identity\n" + "\n".join(noisy) + "\n")
    (out / "megaface_duplicates.txt").write_text("\n".join(duplicates) + "\n")
    return {"protocol": "megaface", "path": str(out), "probes": len(probes), "distractors": len(distractor_paths),
            "noisy_probes": len(noisy_probes), "noisy_distractors": len(noisy) + len(duplicates)}


def write_trillion_pairs(out: str | Path, identities: int = 10, images_per_identity: int = 4, distractors: int = 60,
                         seed: int = 0) -> dict:
    out = Path(out)
    rng = np.random.default_rng([seed, 12])
    lines = []
    for i, person in enumerate(_people(seed, 11, identities)):
        for n in range(images_per_identity):
            rel = f"elfw/id{i:05d}/{n}.jpg"
            _write(out / rel, _face(person, rng))
            lines.append(f"{rel} id{i:05d}")
    others = []
    for d, person in enumerate(_people(seed, 13, distractors)):
        rel = f"distractors/{d // 25:03d}/{d}.jpg"
        _write(out / rel, _face(person, rng))
        others.append(rel)
    (out / "elfw_list.txt").write_text("\n".join(lines) + "\n")
    (out / "distractor_list.txt").write_text("\n".join(others) + "\n")
    return {"protocol": "trillion-pairs", "path": str(out), "elfw": len(lines), "distractors": len(others)}


def write_mfr(out: str | Path, identities: int = 12, images_per_identity: int = 4, seed: int = 0) -> dict:
    out = Path(out)
    rng = np.random.default_rng([seed, 22])
    for i, person in enumerate(_people(seed, 21, identities)):
        for n in range(images_per_identity):
            _write(out / "images" / f"{i:06d}" / f"{n}.jpg", _face(person, rng))
    return {"protocol": "mfr-all", "path": str(out), "images": identities * images_per_identity}


def write_ytf(out: str | Path, people: int = 12, videos_per_person: int = 3, frames: int = 3, splits: int = 10,
              pairs_per_split: int = 10, seed: int = 0) -> dict:
    """Videos are sessions: one pose family and light, small changes frame to frame (a video's
    frames are renders with the same nuisance seed family)."""
    out = Path(out)
    persons = _people(seed, 31, people)
    videos = []
    for p, person in enumerate(persons):
        name = f"Person_{p:03d}"
        for v in range(videos_per_person):
            for f in range(frames):
                rng = np.random.default_rng([seed, 32, p, v, f])
                _write(out / "aligned_images_DB" / name / str(v) / f"aligned_detect_{v}.{f + 1}.jpg", _face(person, rng))
            videos.append((name, v))
    rng = np.random.default_rng([seed, 33])
    rows = ["split number, first name, second name, match dist, is same"]
    for s in range(1, splits + 1):
        for k in range(pairs_per_split):
            same = k < pairs_per_split // 2
            if same:
                name = f"Person_{int(rng.integers(people)):03d}"
                a, b = rng.choice(videos_per_person, 2, replace=False)
                first, second = f"{name}/{a}", f"{name}/{b}"
            else:
                p, q = rng.choice(people, 2, replace=False)
                first = f"Person_{p:03d}/{int(rng.integers(videos_per_person))}"
                second = f"Person_{q:03d}/{int(rng.integers(videos_per_person))}"
            rows.append(f"{s}, {first}, {second}, 0, {int(same)}")
    (out / "splits.txt").write_text("\n".join(rows) + "\n")
    return {"protocol": "ytf", "path": str(out), "videos": len(videos), "pairs": splits * pairs_per_split}


WRITERS = {"megaface": write_megaface, "trillion-pairs": write_trillion_pairs, "mfr-all": write_mfr, "ytf": write_ytf}


def write_releases(out: str | Path, protocols=PROTOCOLS, seed: int = 0) -> dict[str, dict]:
    """One small release per protocol under out/<protocol>/ (what `arcface demo-data` adds)."""
    return {p: WRITERS[p](Path(out) / p, seed=seed) for p in protocols}
