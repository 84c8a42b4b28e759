"""The rules `arcface clean-data` chooses its settings by, from what it measures on the data
(no training here: the rules on their own figures)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from cleaning.denoise import round_decision, valley_threshold
from pipelines.clean_data import bootstrap_advice, bootstrap_length
from pipelines.denoise_config import DenoiseConfig


def test_bootstrap_epochs_are_raised_until_the_minimum_steps():
    # The demo at 50 x 20: ~930 faces after stage 1, batch 64 -> 14 steps an epoch; the
    # configured 2 epochs would be 28 steps, most of them warm-up.
    length = bootstrap_length(faces=932, batch=64, epochs=2, min_steps=200)
    assert length["steps_per_epoch"] == 14
    assert length["epochs"] == 15 and length["steps"] == 210 >= 200
    assert length["rule"] == "epochs raised to reach the minimum steps"
    assert length["configured_epochs"] == 2 and length["faces"] == 932


def test_bootstrap_keeps_its_epochs_when_they_already_take_the_minimum_steps():
    # A large dataset: one epoch is far more than the minimum; the configured epochs stand.
    length = bootstrap_length(faces=5_800_000, batch=512, epochs=2, min_steps=200)
    assert length["epochs"] == 2 and length["steps"] == 2 * (5_800_000 // 512)
    assert length["rule"] == "configured epochs"


def test_bootstrap_minimum_zero_is_the_configured_epochs():
    assert bootstrap_length(faces=932, batch=64, epochs=2, min_steps=0)["epochs"] == 2


def test_bootstrap_minimum_is_exact_at_a_multiple_of_the_epoch():
    assert bootstrap_length(faces=640, batch=64, epochs=1, min_steps=200)["epochs"] == 20  # 10 steps an epoch


def test_bootstrap_min_steps_is_a_declared_setting():
    from dataclasses import fields

    field = {f.name: f for f in fields(DenoiseConfig)}["bootstrap_min_steps"]
    assert field.default == 0 and field.metadata["range"] == "[0, inf)"


def _mixture(seed: int, clean: tuple, noisy: tuple, noise_share: float, n: int = 1000):
    rng = np.random.default_rng(seed)
    k = int(noise_share * n)
    return np.concatenate([rng.normal(*clean, n - k), rng.normal(*noisy, k)]).clip(0, 180)


def test_a_clear_valley_decides_by_its_own_share():
    # A good model at 40% noise: clean faces ~25 deg from their centre, mislabelled ~70.
    angles = _mixture(1, (25, 5), (70, 8), 0.4)
    threshold, derived = valley_threshold(angles)
    assert derived["rule"].startswith("otsu")
    d = round_decision(angles, threshold, derived, another_round_above=0.2)
    # With a clear valley, the threshold and Otsu's split find the same faces, whichever decides.
    assert abs(d["share_found"] - d["share_beyond_otsu"]) < 0.01
    assert d["another_round"] and 0.35 < d["share_found"] < 0.45
    assert d["intermediate_cut_deg"] == round(min(threshold, derived["otsu_deg"]), 2)


def test_a_fallback_threshold_does_not_stop_the_loop_on_its_few_drops():
    # A weak round-1 model at 45% noise: the mislabelled faces' mode is broad and overlaps
    # the clean one. The one-mode rule puts the cut far out (the sweep saw 61-141 deg) and
    # finds a few percent: not evidence of little noise. The share beyond Otsu's split decides.
    angles = _mixture(2, (30, 8), (60, 15), 0.4)
    threshold, derived = valley_threshold(angles)
    assert derived["rule"].startswith("one mode") and threshold > 90
    d = round_decision(angles, threshold, derived, another_round_above=0.2)
    assert d["share_found"] < 0.05  # what the old rule weighed: one round only
    assert d["another_round"] and d["share_beyond_otsu"] >= 0.2
    assert "fallback" in d["decided_by"]
    # The intermediate round cuts at Otsu's split, so the next model trains on purer labels.
    assert d["intermediate_cut_deg"] == round(derived["otsu_deg"], 2) < threshold


def test_a_floor_above_otsu_is_a_fallback_too():
    derived = {"rule": "otsu, floored at the clean mode's median + 4 robust sigmas", "otsu_deg": 50.0,
               "clean_mode_floor_deg": 70.0}
    angles = np.array([20.0] * 60 + [55.0] * 30 + [80.0] * 10)
    d = round_decision(angles, 70.0, derived, another_round_above=0.2)
    assert d["share_found"] == 0.1 and d["share_beyond_otsu"] == 0.4 and d["deciding_share"] == 0.4
    assert d["another_round"] and d["intermediate_cut_deg"] == 50.0


def test_little_noise_under_a_trusted_valley_stops_the_loop():
    derived = {"rule": "otsu, floored at the clean mode's median + 4 robust sigmas", "otsu_deg": 50.0,
               "clean_mode_floor_deg": 45.0}
    angles = np.array([20.0] * 90 + [80.0] * 10 + [np.nan] * 5)  # NaN: unjudged faces
    d = round_decision(angles, 50.0, derived, another_round_above=0.2)
    assert d["share_found"] == d["deciding_share"] == 0.1 and not d["another_round"]


def test_a_configured_angle_decides_by_its_own_share():
    d = round_decision(np.array([10.0] * 7 + [60.0] * 3), 50.0, {"rule": "configured"}, another_round_above=0.2)
    assert d["share_found"] == 0.3 and d["another_round"] and d["intermediate_cut_deg"] == 50.0
    assert not round_decision(np.array([10.0] * 9 + [60.0]), 50.0, {"rule": "configured"}, 0.2)["another_round"]
    # 0: always `rounds` rounds
    assert round_decision(np.array([10.0] * 10), 50.0, {"rule": "configured"}, 0.0)["another_round"]


def _faces(rng, centre: np.ndarray, n: int, spread: float) -> np.ndarray:
    x = centre + spread * rng.normal(size=(n, len(centre)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _turned(a: np.ndarray, b: np.ndarray, degrees: float) -> np.ndarray:
    """The unit vector `degrees` from unit `a` towards `b`."""
    b = b - (a @ b) * a
    b /= np.linalg.norm(b)
    t = np.radians(degrees)
    return np.cos(t) * a + np.sin(t) * b


def test_look_alike_faces_nearer_their_own_person_are_label_noise_but_a_person_filed_twice_is_not():
    from cleaning.denoise import EmbeddedSet, IntraClassOutliers

    rng = np.random.default_rng(3)
    dim = 64
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    person_a, far = basis[0], basis[1]
    look_alike = _turned(person_a, far, 35)  # a look-alike of A
    other = basis[2]
    # Identity 0: 14 faces of A and 6 of the look-alike (filed under A); identity 1: the
    # look-alike's own 14; identities 2 and 3: one more person filed twice (10 + 10).
    faces = np.concatenate([_faces(rng, person_a, 14, 0.03), _faces(rng, look_alike, 6, 0.03),
                            _faces(rng, look_alike, 14, 0.03), _faces(rng, other, 20, 0.03)])
    groups = np.array([0] * 20 + [1] * 14 + [2] * 10 + [3] * 10)
    names = np.array([f"n{g}" for g in groups], object)

    def judge(nearer_another: bool) -> EmbeddedSet:
        data = EmbeddedSet(faces.astype(np.float32), groups.copy(), names)
        step = IntraClassOutliers(max_angle=60, min_images_to_judge=5, nearer_another=nearer_another)
        step(data)
        return data, step

    data, _ = judge(False)
    assert data.kept.all()  # 60 deg: the look-alike's faces sit well inside the threshold
    data, step = judge(True)
    assert np.flatnonzero(~data.kept).tolist() == list(range(14, 20))  # exactly the look-alike's faces under A
    assert all(d.startswith("nearer identity n1's centre") for d in data.details[14:20])
    assert data.reasons[14] == "intra_class/far_from_identity_centre"  # label noise, counted as such
    assert step.figures["nearer_another_identity"]["dropped"] == 6
    # The person filed twice (2 and 3) intermix but lie within same_person_angle: kept for MergeIdentities.
    assert data.kept[34:].all()


def test_the_report_shows_what_the_loop_chose():
    from cleaning.report import loop_html

    loop = {"bootstraps": [{"model": "m1", **bootstrap_length(932, 64, 2, 200)}],
            "rounds": [{"round": 1, "judged_faces": 900,
                        **round_decision(np.array([20.0] * 60 + [55.0] * 30 + [80.0] * 10), 70.0,
                                         {"rule": "one mode: median + 4 robust sigmas", "otsu_deg": 50.0}, 0.2)}]}
    page = loop_html(loop)
    assert "epochs raised to reach the minimum steps" in page and "<td>210</td>" in page
    assert "fallback rule" in page and "<td>0.4</td>" in page and "<td>yes</td>" in page
    assert "<td>-</td>" in page and "Advice" not in page  # a manifest from before starts were recorded
    loop["rounds"][0]["share_set_aside"] = 0.4731
    assert "<th>share set aside</th>" in loop_html(loop) and "<td>0.4731</td>" in loop_html(loop)
    loop["bootstraps"][0]["started_from"] = ""
    assert "<td>random weights</td>" in loop_html(loop)
    loop["advice"] = bootstrap_advice(loop["rounds"][0], "")
    loop["bootstraps"][0]["started_from"] = "s3://models/r50 <face>.pt"
    page = loop_html(loop)
    assert "<b>Advice:</b> round 1 found 47% of the judged faces mislabelled" in page
    assert "<td>s3://models/r50 &lt;face&gt;.pt</td>" in page  # escaped
    assert loop_html(None) == ""


def test_advice_only_for_heavy_noise_judged_from_random_weights():
    heavy = {"round": 1, "deciding_share": 0.31, "another_round": True}
    assert "train.init_backbone" in bootstrap_advice(heavy, "") and "31%" in bootstrap_advice(heavy, "")
    assert bootstrap_advice(heavy, "/models/face.pt") == ""  # already started from a face model
    # Light noise says nothing, even where a low denoise.another_round_above asked for a round.
    assert bootstrap_advice({**heavy, "deciding_share": 0.05}, "") == ""
    # 45% look-alike noise, seed 12 from random weights: the angles beyond Otsu's split were
    # 23% of the faces, but the round set aside 47% (nearer-another included) and missed the bar.
    weak = {"round": 1, "deciding_share": 0.2291, "another_round": True, "share_set_aside": 0.4731}
    assert "47%" in bootstrap_advice(weak, "")
    assert bootstrap_advice({**weak, "share_set_aside": 0.12}, "") == ""


def test_an_identity_outnumbered_by_a_look_alike_takes_back_its_own_person():
    from cleaning.denoise import EmbeddedSet, IntraClassOutliers

    rng = np.random.default_rng(4)
    dim = 64
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    own, look_alike, twice, alias_person, taker = basis[0], _turned(basis[0], basis[1], 35), basis[2], basis[3], basis[4]
    # n0: its own person (6 faces) outnumbered by a look-alike (8) whose own identity is n1 (14).
    # n2: a person (10) with 5 faces of that look-alike: keeps its own, drops the look-alike's.
    # n3: 6 faces of n4's person (10; n3 is its alias: one person filed twice) and 5 tight faces
    # of n5's person (12), its densest part. Both persons have more faces elsewhere: n3 takes
    # its largest, the alias's person, to be merged with n4.
    blocks = [(own, 6, 0.03, 0), (look_alike, 8, 0.03, 0), (look_alike, 14, 0.03, 1), (twice, 10, 0.03, 2),
              (look_alike, 5, 0.03, 2), (alias_person, 6, 0.03, 3), (taker, 5, 0.015, 3),
              (alias_person, 10, 0.03, 4), (taker, 12, 0.03, 5)]
    faces = np.concatenate([_faces(rng, c, n, s) for c, n, s, _ in blocks]).astype(np.float32)
    groups = np.concatenate([[g] * n for _, n, _, g in blocks])
    person = np.concatenate([[i] * n for i, (_, n, _, _) in enumerate(blocks)])
    names = np.array([f"n{g}" for g in groups], object)

    def judge(nearer_another: bool):
        data = EmbeddedSet(faces, groups.copy(), names)
        step = IntraClassOutliers(max_angle=25, min_images_to_judge=5, nearer_another=nearer_another)
        step(data)
        return data, step

    data, _ = judge(False)  # centres from the densest part alone: n0 and n3 are taken over
    assert set(person[data.kept & (groups == 0)]) == {1} and set(person[data.kept & (groups == 3)]) == {6}
    data, step = judge(True)
    assert set(person[data.kept & (groups == 0)]) == {0}  # its own 6 faces, the look-alike's dropped
    assert (data.kept & (groups == 0)).sum() == 6
    assert set(person[data.kept & (groups == 2)]) == {3}  # a look-alike with a home of its own: not taken
    assert set(person[data.kept & (groups == 3)]) == {5}  # the alias's person, to be merged with n4
    persons = step.figures["persons"]
    assert persons["moved_off_their_largest_person"] == ["n0"]  # n3's largest is the alias's person
    assert persons["identities_given_a_person"] == 5  # all but n3, whose persons n4 and n5 have more of
    from cleaning.report import persons_html

    page = persons_html(persons)
    assert "moved off their largest person" in page.lower() and ": 1: n0. " in page
    assert "broken by the noise the folders share: 0;" in page and "from the same people: 0</p>" in page
    assert data.kept[groups == 1].all() and data.kept[groups == 4].all() and data.kept[groups == 5].all()


def test_an_identity_left_without_a_person_takes_its_unclaimed_faces_unless_it_is_an_alias():
    from cleaning.denoise import EmbeddedSet, IntraClassOutliers

    rng = np.random.default_rng(5)
    dim = 64
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    own, look_alike, twice, stray = basis[0], _turned(basis[0], basis[1], 35), basis[2], basis[3]
    # n0: 4 faces of its own person, too few to be given (min 5), and 5 of a look-alike whose
    # identity n1 holds 14 (the seed sweep's 45% confusable noise, seeds 3 and 4). n2: 9 faces
    # of a person n3 holds 12 of (one person filed twice) and 3 of a stray person nobody holds.
    blocks = [(own, 4, 0), (look_alike, 5, 0), (look_alike, 14, 1), (twice, 9, 2), (stray, 3, 2), (twice, 12, 3)]
    faces = np.concatenate([_faces(rng, c, n, 0.03) for c, n, _ in blocks]).astype(np.float32)
    groups = np.concatenate([[g] * n for _, n, g in blocks])
    person = np.concatenate([[i] * n for i, (_, n, _) in enumerate(blocks)])
    data = EmbeddedSet(faces, groups.copy(), np.array([f"n{g}" for g in groups], object))
    IntraClassOutliers(max_angle=25, min_images_to_judge=5, nearer_another=True)(data)
    assert set(person[data.kept & (groups == 0)]) == {0}  # its own 4, not the look-alike's 5
    assert set(person[data.kept & (groups == 2)]) == {3}  # the alias keeps its person (9 against 3)
    assert data.kept[groups == 1].all() and data.kept[groups == 3].all()


def _person_p_its_look_alike_q_and_three_others(seed: int):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    return rng, (basis[0], _turned(basis[0], basis[1], 35), basis[2], basis[3], basis[4])


def _merged(data) -> list:
    from cleaning.denoise import MergeIdentities

    merge = MergeIdentities(max_angle=40)
    merge(data)
    return [sorted(m.identities) for m in merge.merges]


def _persons_judged(rng, blocks: list) -> tuple:
    """The folders of `blocks` (as _folders) judged by the intra-class step with its persons
    and nearer-another rules; also the step (its figures), and what _folders returns."""
    from cleaning.denoise import IntraClassOutliers

    data, shows, names = _folders(rng, blocks)
    step = IntraClassOutliers(max_angle=25, min_images_to_judge=5, nearer_another=True)
    step(data)
    return data, step, shows, names


def _folders(rng, blocks: list):
    """An EmbeddedSet of folders from (person's centre, faces, folder name) blocks; also which
    block each face shows and its folder's name."""
    from cleaning.denoise import EmbeddedSet

    faces = np.concatenate([_faces(rng, c, n, 0.02) for c, n, _ in blocks]).astype(np.float32)
    order = list(dict.fromkeys(name for _, _, name in blocks))
    groups = np.concatenate([[order.index(name)] * n for _, n, name in blocks])
    shows = np.concatenate([[k] * n for k, (_, n, _) in enumerate(blocks)])
    names = np.array([order[g] for g in groups], object)
    return EmbeddedSet(faces, groups.copy(), names), shows, names


@pytest.mark.parametrize("own_first", [True, False])
def test_a_folder_tied_between_two_persons_goes_with_the_folder_of_the_same_noise(own_first):
    rng, (p, q, r, s, t) = _person_p_its_look_alike_q_and_three_others(seed=8)
    # The seed sweep's 45% look-alike noise, seed 8: F holds 6 faces of its person P, 6 of P's
    # look-alike Q, 4 of R and 3 of S (P's other look-alikes). A, P filed a second time, holds
    # 12 of P, 4 of Q and 2 of S; Q's folder 13 of Q and 3 of T. P goes to A, Q to Q's folder,
    # and F, tied 6-6, has no person of its own: it goes with A, whose folder holds the same
    # other persons (S), not with Q's (T), whichever person has the lower label.
    tied = [(p, 6, "F"), (q, 6, "F")]
    folder_f = (tied if own_first else tied[::-1]) + [(r, 4, "F"), (s, 3, "F")]
    folder_a = [(p, 12, "A"), (q, 4, "A"), (s, 2, "A")]
    folder_q = [(q, 13, "Q"), (t, 3, "Q")]
    rest = [(r, 12, "R"), (s, 12, "S"), (t, 12, "T")]
    blocks = folder_f + folder_a + folder_q + rest
    data, step, shows, names = _persons_judged(rng, blocks)
    assert set(shows[data.kept & (names == "F")]) == {0 if own_first else 1}  # F keeps P's 6 faces
    persons = step.figures["persons"]
    # Moved off Q, the lower label, by the noise the folders share (the tie rule's or, first,
    # the noise sources', which see the same R and S faces here).
    assert persons["ties_broken_by_shared_noise"] + persons["taken_by_noise_sources"] == (0 if own_first else 1)
    assert _merged(data) == [["A", "F"]]


def test_a_folder_outnumbered_by_a_look_alike_goes_with_the_folder_of_the_same_noise_sources():
    rng, (p, q, r, s, t) = _person_p_its_look_alike_q_and_three_others(seed=8)
    # The face-model seed sweep's 40% look-alike noise, seed 8: F holds 5 faces of its person P
    # and 6 of P's look-alike Q, and its other noise (R, S) lies beyond the threshold, in no
    # person. A, P filed a second time, holds 12 of P and noise from R and S too; Q's folder
    # holds 13 of Q and noise from T. P goes to A and Q to Q's folder; counting faces, F would
    # take Q (6 > 5). Its noise comes from where A's does: it goes with A.
    blocks = [(p, 5, "F"), (q, 6, "F"), (r, 4, "F"), (s, 3, "F"),
              (p, 12, "A"), (r, 2, "A"), (s, 2, "A"),
              (q, 13, "Q"), (t, 3, "Q"),
              (r, 12, "R"), (s, 12, "S"), (t, 12, "T")]
    data, step, shows, names = _persons_judged(rng, blocks)
    assert set(shows[data.kept & (names == "F")]) == {0}  # F keeps P's 5 faces
    assert step.figures["persons"]["taken_by_noise_sources"] == 1
    assert _merged(data) == [["A", "F"]]


def test_a_folder_whose_own_person_went_elsewhere_keeps_it_when_it_holds_more_than_twice_a_look_alikes():
    rng, (p, q, r, s, t) = _person_p_its_look_alike_q_and_three_others(seed=2)
    # Modelled on the face-model seed sweep at 200 x 30, 30% look-alike noise, seed 2, where a
    # folder's own 16 faces were linked into a look-alike's person and given to its folder.
    # Here F's own person P (16 faces) is given to B, which holds more of it (20: P filed
    # twice); F also holds 5 of P's look-alike Q, whose folder draws noise from R as F does.
    # The noise sources point at Q's folder, but 16 faces against 5 decide: F keeps P's faces
    # (and is merged with B, P's other folder).
    blocks = [(p, 16, "F"), (q, 5, "F"), (r, 3, "F"),
              (p, 20, "B"), (t, 3, "B"),
              (q, 13, "Q"), (r, 3, "Q"),
              (r, 12, "R"), (t, 12, "T")]
    data, step, shows, names = _persons_judged(rng, blocks)
    assert set(shows[data.kept & (names == "F")]) == {0}  # F keeps P's 16 faces
    assert step.figures["persons"]["taken_by_noise_sources"] == 0
    assert _merged(data) == [["B", "F"]]


def test_two_look_alikes_whose_folders_hold_each_others_faces_are_two_people():
    from cleaning.denoise import EmbeddedSet, IntraClassOutliers, MergeIdentities

    rng = np.random.default_rng(9)
    dim = 64
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    a, b = basis[0], _turned(basis[0], basis[1], 40)
    # n0: 12 faces of A and 8 of its look-alike B; n1: 12 of B and 8 of A (the seed sweep's
    # 200x30, 45% look-alike noise, seed 7: 9 own and 10 of the other, 12 own and 4). Their kept
    # mixtures' underlying centres lie 5 deg apart; their persons do not. n2, n3: one person
    # filed twice; n4..n9: six more people.
    blocks = [(a, 12, 0), (b, 8, 0), (b, 12, 1), (a, 8, 1), (basis[2], 10, 2), (basis[2], 10, 3),
              *[(basis[4 + k], 12, 4 + k) for k in range(6)]]
    faces = np.concatenate([_faces(rng, c, n, 0.02) for c, n, _ in blocks]).astype(np.float32)
    groups = np.concatenate([[g] * n for _, n, g in blocks])
    person = np.concatenate([[i] * n for i, (_, n, _) in enumerate(blocks)])
    names = np.array([f"n{g}" for g in groups], object)
    data = EmbeddedSet(faces, groups.copy(), names)
    step = IntraClassOutliers(max_angle=50, min_images_to_judge=5, nearer_another=True)
    step(data)
    assert set(person[data.kept & (groups == 0)]) == {0} and set(person[data.kept & (groups == 1)]) == {2}
    assert data.kept[groups >= 2].all()
    assert step.figures["nearer_another_identity"]["pairs_of_two_people"] == 1
    merge = MergeIdentities(max_angle=40)
    merge(data)
    assert [m.identities for m in merge.merges] == [["n2", "n3"]]  # the person filed twice only


def test_persons_are_given_so_as_to_keep_the_most_faces():
    from cleaning.denoise import _give_persons

    # F holds 12 faces of P (a look-alike) and 7 of its own person; G and H are P filed twice
    # (11 and 10 faces). Largest first would give P to F and leave F's own person unclaimed;
    # the matching gives P to G (H shares it later: a merge) and F keeps its own.
    faces_of = {("F", "P"): 12, ("F", "own"): 7, ("G", "P"): 11, ("H", "P"): 10, ("H", "Q"): 3}
    assert _give_persons(faces_of, min_faces=5) == {"F": "own", "G": "P"}
    assert _give_persons(faces_of, min_faces=5, max_cells=1) == {"F": "P"}  # the fallback, largest first
    assert _give_persons({("F", "P"): 4}, min_faces=5) == {}  # too few faces to be anyone's person


def test_nearer_another_weighs_the_nearest_identities_as_a_search_of_all_would():
    from cleaning.denoise import _block_nearest_identity, _nearest_centres, normalise
    import torch

    rng = np.random.default_rng(5)
    num, dim = 40, 16
    centres = normalise(torch.from_numpy(rng.normal(size=(num, dim)).astype(np.float32))).numpy()
    groups = rng.integers(0, num, 2000)
    faces = normalise(torch.from_numpy(centres[groups] + 0.8 * rng.normal(size=(2000, dim)).astype(np.float32))).numpy()
    present = np.arange(num)
    brute = (faces @ centres.T).argmax(1)  # every centre
    away = brute != groups
    for k in (num - 1, 8):  # all others; the 8 nearest (the rule's restriction)
        candidates = _nearest_centres(centres, present, num, k)
        assert (candidates[:, :k] >= 0).all() and not (candidates == np.arange(num)[:, None]).any()
        rows, other = _block_nearest_identity(faces, 0, centres, candidates, groups, np.ones(2000, bool), chunk=300)
        if k == num - 1:
            assert rows.tolist() == np.flatnonzero(away).tolist() and (other == brute[away]).all()
        else:  # a subset of what the full search finds, each nearer the identity named than its own
            assert set(rows.tolist()) <= set(np.flatnonzero(away).tolist()) and len(rows) > 0.5 * away.sum()
            assert ((faces[rows] * centres[other]).sum(1) > (faces[rows] * centres[groups[rows]]).sum(1)).all()
            assert (candidates[groups[rows]] == other[:, None]).any(1).all()


def _overlap_case(seed: int):
    """Three training identities of 12 faces: n0, also an evaluation person; n1, a neighbour
    30 deg away, near enough that evaluation faces of n0's person fail the ratio test (a weak
    model); n2, someone else. Returns the generator, the basis, the faces and their groups."""
    rng = np.random.default_rng(seed)
    dim = 64
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    person, near, far = basis[0], _turned(basis[0], basis[1], 30), basis[2]
    faces = np.concatenate([_faces(rng, person, 12, 0.04), _faces(rng, near, 12, 0.04), _faces(rng, far, 12, 0.04)])
    return rng, basis, faces.astype(np.float32), np.repeat([0, 1, 2], 12)


def _judge_overlap(faces, groups, eval_faces, **settings):
    from cleaning.denoise import EmbeddedSet, EvaluationOverlap

    data = EmbeddedSet(faces, groups.copy(), np.array([f"n{g}" for g in groups], object))
    data.angles = np.full(len(groups), 20.0)  # as IntraClassOutliers leaves them
    step = EvaluationOverlap(eval_faces, max_angle=40, min_faces=3, same_person_angle=10.0, **settings)
    step(data)
    return data, step.figures


def test_an_evaluation_person_the_ratio_test_misses_is_found_by_its_underlying_centre():
    rng, basis, faces, groups = _overlap_case(6)
    # The evaluation set: 6 faces of n0's person, 6 of a held-out person.
    eval_faces = np.concatenate([_faces(rng, basis[0], 6, 0.04), _faces(rng, basis[3], 6, 0.04)]).astype(np.float32)

    def overlap(max_ratio: float):
        return _judge_overlap(faces, groups, eval_faces, max_ratio=max_ratio)

    # Their ratios to the neighbour are 0.51-0.58: at 0.53, 2 of the 6 pass (3 are needed).
    data, figures = overlap(max_ratio=0.53)
    assert (~data.kept).tolist() == (groups == 0).tolist()  # n0 only; not its neighbour, not n2
    # found by its underlying centre, the ratio test having passed fewer than 3 of its faces
    assert figures["identities_by_same_person"] == ["n0"] and figures["identities_by_embedding"] == ["n0"]
    assert set(data.reasons[groups == 0]) == {"evaluation_overlap/overlaps_evaluation_set"}
    # With none passing the ratio test there is no direct evidence at all: kept (a held-out
    # look-alike's faces can show a training person's centre: 2 of the sweep's 60 cases).
    data, figures = overlap(max_ratio=0.1)
    assert data.kept.all() and figures["identities_by_embedding"] == []


def test_an_evaluation_person_is_weighed_whole_when_the_sets_say_which_faces_are_one_person():
    rng, basis, faces, groups = _overlap_case(8)
    # The evaluation set: 6 faces of n0's person, spread as a weak model spreads them (no face
    # passes a strict ratio test), 6 of a held-out look-alike of n1 (25 deg from it) and 6 of
    # a stranger.
    look_alike = _turned(_turned(basis[0], basis[1], 30), basis[4], 25)
    eval_faces = np.concatenate([_faces(rng, basis[0], 6, 0.06), _faces(rng, look_alike, 6, 0.04),
                                 _faces(rng, basis[3], 6, 0.04)]).astype(np.float32)
    people = np.repeat([7, 3, 5], 6)

    def overlap(eval_people):
        return _judge_overlap(faces, groups, eval_faces, max_ratio=0.1, eval_people=eval_people)

    data, figures = overlap(None)  # face by face: no evidence
    assert data.kept.all()
    # The same persons found a chunk of one person at a time as all at once.
    from cleaning.denoise import Embeddings, EvaluationOverlap, group_sums

    sums, counts = group_sums(Embeddings(faces), groups, np.ones(len(groups), bool), 3)
    step = EvaluationOverlap(eval_faces, 40, 3, eval_people=people)
    assert step._by_evaluation_person(sums, counts.numpy(), np.arange(3)) == {0}
    assert step._by_evaluation_person(sums, counts.numpy(), np.arange(3), chunk_elements=1) == {0}
    # A model trained a few steps puts everyone within a few degrees: no identity is clearly
    # any evaluation person's (the rehearsal's demo lost every identity before this test).
    collapsed = _faces(rng, basis[0], 36, 0.005).astype(np.float32)
    sums, counts = group_sums(Embeddings(collapsed), groups, np.ones(len(groups), bool), 3)
    step = EvaluationOverlap(_faces(rng, basis[0], 18, 0.005).astype(np.float32), 40, 3, eval_people=people)
    assert step._by_evaluation_person(sums, counts.numpy(), np.arange(3)) == set()
    data, figures = overlap(people)  # the person's 6 faces together: its underlying centre is n0's
    assert (~data.kept).tolist() == (groups == 0).tolist()  # not n1, whose look-alike is 25 deg off
    assert figures["identities_by_evaluation_person"] == ["n0"] and figures["identities_by_embedding"] == ["n0"]


def test_evaluation_people_are_linked_by_same_pairs_identities_and_repeated_images():
    from pipelines.evaluate import FaceSet, PairSet
    from pipelines.stage2_ray import evaluation_people

    rng = np.random.default_rng(0)
    a, b, c, d, e, f, g = (rng.integers(0, 255, (4, 4, 3), dtype=np.uint8) for _ in range(7))
    pairs = PairSet("p", "p", np.stack([a, b, c, d, a, e]), np.array([True, False, True]))
    named = FaceSet("f", "f", np.stack([d, f, g]), np.array(["x", "y", "x"]))
    faces, people = evaluation_people([pairs], [named])
    assert [x.tobytes() for x in faces] == [x.tobytes() for x in (a, b, c, d, e, f, g)]  # each once, first seen
    same = people[:, None] == people[None, :]
    # a-b and a-e (same pairs), d-g (one identity in the identification set; d also in a pair)
    expected = {frozenset("abe"), frozenset("c"), frozenset("dg"), frozenset("f")}
    names = np.array(list("abcdefg"))
    assert {frozenset(names[row]) for row in same} == expected
    assert len(evaluation_people([], [])[1]) == 0


def test_nearer_another_on_rows_of_many_identities_equals_the_small_case_rule():
    # Rows not in label order: a chunk's candidate centres would be most of 10,000 identities,
    # so each face is weighed against its own identity's candidates instead. Same answer.
    from cleaning.denoise import _block_nearest_identity, _nearest_centres, normalise
    import torch

    rng = np.random.default_rng(7)
    num, dim, n = 10_000, 8, 4096
    centres = normalise(torch.from_numpy(rng.normal(size=(num, dim)).astype(np.float32))).numpy()
    groups = rng.integers(0, num, n)
    faces = normalise(torch.from_numpy(centres[groups] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32))).numpy()
    candidates = _nearest_centres(centres, np.arange(num), num, 32)
    rows, other = _block_nearest_identity(faces, 0, centres, candidates, groups, np.ones(n, bool))
    sims = np.einsum("nd,nkd->nk", faces, centres[candidates[groups]])
    own = (faces * centres[groups]).sum(1)
    expected = np.flatnonzero(sims.max(1) > own)
    assert rows.tolist() == expected.tolist() and len(rows) > 0
    assert (other == candidates[groups][expected, sims[expected].argmax(1)]).all()


def _circle_of_people(seed: int, spread: float):
    """Six people 60 deg apart on a circle and a seventh identity 15 deg from the first: the
    first person filed twice, whose two folders' photos differ (their centres 15 deg apart)."""
    rng = np.random.default_rng(seed)
    dim = 16
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    centres = [_turned(basis[0], basis[1], 60 * i) for i in range(6)] + [_turned(basis[0], basis[1], 15)]
    faces = np.concatenate([_faces(rng, c, 12, spread) for c in centres]).astype(np.float32)
    return faces, np.repeat(np.arange(7), 12)


def test_the_same_person_angle_is_derived_from_how_far_apart_the_identities_lie():
    from cleaning.denoise import SAME_PERSON_SHARE_OF_NEAREST, Embeddings, derived_same_person_angle

    faces, groups = _circle_of_people(0, spread=0.005)
    angle, evidence = derived_same_person_angle(Embeddings(faces), groups, np.ones(len(groups), bool), 7)
    # Nearest others: 15, 15 (the two folders of one person), 45 (the second person, to the
    # seventh identity), and 60 for the other four: the median is 60.
    assert evidence["median_nearest_identity_deg"] == pytest.approx(60, abs=0.5)
    assert angle == pytest.approx(SAME_PERSON_SHARE_OF_NEAREST * 60, abs=0.2)
    assert evidence["identities"] == 7
    # Only the faces given count: the first five people alone lie 60 deg from their nearest.
    some = groups < 5
    _, fewer = derived_same_person_angle(Embeddings(faces), groups, some, 7)
    assert fewer["identities"] == 5 and fewer["median_nearest_identity_deg"] == pytest.approx(60, abs=0.5)


def test_a_person_filed_twice_joins_under_the_derived_angle_where_the_fixed_one_splits_it():
    from pipelines.stage2_ray import denoise_steps

    from cleaning.denoise import EmbeddedSet

    faces, groups = _circle_of_people(2, spread=0.12)

    def judge(same_person_angle: float):
        data = EmbeddedSet(faces, groups.copy(), np.array([f"n{g}" for g in groups], object))
        steps = denoise_steps(DenoiseConfig(max_angle=80, merge_same_person_angle=same_person_angle), None)
        for step in steps:
            step(data)
        return data, steps

    # 10 deg: the two folders (underlying centres ~16 deg apart) are two people; each one's
    # faces nearer the other are dropped as label noise, and they do not merge.
    data, steps = judge(10.0)
    assert not data.kept.all() and steps[1].figures["merged_sets"] == 0
    # Derived: 0.45 of the median nearest angle (~58 deg) is ~26: one person, no face lost.
    data, steps = judge(0.0)
    figures = steps[0].figures
    assert figures["same_person_angle_from"]["rule"].startswith("0.45 of the median angle")
    assert 24 < figures["same_person_angle"] < 28
    assert steps[1].same_person_angle == pytest.approx(figures["same_person_angle"], abs=0.01)
    shown = {steps[i].figures["same_person_angle"] for i in range(3)}  # outliers, merges, evaluation overlap
    assert shown == {figures["same_person_angle"]}
    assert data.kept.all() and steps[1].figures["merged_sets"] == 1
    assert sorted(np.unique(data.groups[groups == 6])) == [0]


def test_a_derived_same_person_angle_needs_the_outlier_step_first():
    from cleaning.denoise import EmbeddedSet, MergeIdentities

    faces, groups = _circle_of_people(0, spread=0.05)
    data = EmbeddedSet(faces, groups.copy(), np.array([f"n{g}" for g in groups], object))
    data.angles = np.full(len(groups), 5.0)
    with pytest.raises(ValueError, match="run IntraClassOutliers first"):
        MergeIdentities(max_angle=30, same_person_angle=0)(data)


def test_the_report_shows_the_same_person_angle_and_where_it_came_from():
    from cleaning.report import same_person_html

    derived = {"same_person_angle": 21.03, "same_person_angle_from": {
        "rule": "0.45 of the median angle between identities and their nearest other",
        "median_nearest_identity_deg": 63.1, "identities": 52}}
    page = same_person_html(derived)
    assert "within 21.03 deg" in page and "lies 63.1 deg from its nearest other, over 52 identities" in page
    assert "configured" in same_person_html({"same_person_angle": 10.0})
    assert same_person_html({}) == ""


def test_the_nearest_centre_pass_takes_read_only_centres_as_ray_hands_them_without_a_warning():
    # A Ray task's arguments come from the object store read-only; torch.from_numpy on them
    # warned once per worker in every clean-data log (20 times in a 200 x 30 run).
    from cleaning.denoise import _block_nearest_centre
    centres = np.eye(3, dtype=np.float32)
    centres.setflags(write=False)
    block = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.9]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows, nearest = _block_nearest_centre(block, 10, centres, np.array([True] * 12 + [False]))
    assert rows.tolist() == [10, 11] and nearest.tolist() == [1, 0]


def test_the_sweep_summary_counts_a_case_under_the_bar_and_names_the_worst(tmp_path, monkeypatch):
    # benchmarks/results/refinement.md's summary, from a sweep's results JSON: a case fails on
    # any one figure (here a kept evaluation-overlap identity at full precision and recall), and a
    # case that failed to run counts as short of it. benchmarks/ is a folder of scripts, not an
    # installed package, so it is importable only with the checkout's root on the path (the
    # `pytest` entry point, unlike `python -m pytest`, does not put the working directory there).
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks.summarize_refinement_sweeps import summary_rows

    def case(seed, precision, recall, overlap_kept=(), missed=0, level=0.3):
        summary = {"precision": precision, "recall": recall, "false_merges": 0, "missed_merges": missed,
                   "overlap_kept": list(overlap_kept), "overlap_faces_kept": 0, "wrongly_removed": []}
        return {"identities": 50, "images_per_identity": 20, "label_noise": level, "kind": "confusable",
                "seed": seed, "summary": summary, "rounds": {"rounds": 2}}

    results = {"overrides": ["train.init_backbone=/m/backbone.pt"], "code": ["0123456789abcdef"],
               "cases": [case(2, 0.99, 1.0), case(3, 1.0, 1.0, overlap_kept=["n000011"]), case(4, 0.97, 0.99),
                         case(2, 0.90, 0.93, missed=1, level=0.5),
                         {"identities": 50, "images_per_identity": 20, "label_noise": 0.4, "kind": "uniform",
                          "seed": 6, "error": "Traceback ... RuntimeError: bootstrap training failed"}]}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(results))
    band, fifty = summary_rows(path)
    cells = [c.strip() for c in band.split("|")[1:-1]]
    assert cells[:6] == ["face model", "50 x 20", "0.3-0.45", "2 / 4", "0.9700 (0.3 look-alike s4)",
                         "0.9900 (0.3 look-alike s4)"]
    assert cells[8] == "1 in 1 case" and cells[9] == "`sweep` (0123456)"
    assert [c.strip() for c in fifty.split("|")[1:-1]][2:4] == ["0.5", "0 / 1"]
