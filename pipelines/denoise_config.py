"""The [denoise] config section: stage 2 and the `arcface clean-data` loop (pipelines/clean_data.py, pipelines/stage2_ray.py).

Its own module, free of the job's imports, so the config (and `arcface --help`) loads
without Ray or torch."""

from __future__ import annotations

from dataclasses import dataclass

from arcface_core.settings import WORKERS, setting

_ANGLE = "[0, 180]"


@dataclass
class DenoiseConfig:
    """Stage 2 (Ray): de-noise with embeddings; and the `arcface clean-data` loop. Angles in
    degrees. Defaults argued from measurements on the demo data (benchmarks/results/
    stage2_quality.md): they depend on the model that embeds, so check the angle histogram
    in the report (sub-centre ArcFace used 75 deg with a ResNet-100 trained on MS1M)."""

    workers: int = setting(2, range=WORKERS, doc="embedding actors")
    # Each pass of the de-noise steps over the embeddings runs as this many parallel Ray tasks,
    # one embedding shard each (0 or 1: in the driver, shard after shard). Same decisions
    # either way (tests/test_denoise_scale.py); timed in benchmarks/results/stage2_scale.md.
    pass_tasks: int = setting(2, range="[0, inf)", doc=(
        "parallel Ray tasks per pass of the de-noise steps (0 or 1: in the driver)"))
    gpu: bool = setting(False, doc="one GPU per embedding actor (checkpoints; MLflow models embed on CPU)")
    batch: int = setting(256, range="[1, inf)", doc="faces per embedding batch")
    # Faces farther than this from their identity's centre are label noise. 0: derived per
    # run, the valley between the clean and the mislabelled mode of the face-to-centre angles
    # (Otsu's threshold, never below the clean mode's median + 4 robust sigmas; the figure
    # is in the manifest and report). Demo, sub-centre bootstrap: 48.5 deg at 10% label
    # noise, 51.2 at 50%. A fixed angle only fits the model it was measured with (sub-centre
    # ArcFace used 75 with a ResNet-100 on MS1M; the demo's tiny bootstrap, about 50).
    max_angle: float = setting(0.0, range=_ANGLE, doc=(
        "faces farther than this from their identity's centre are label noise (0: derived per run)"))
    # Look-alike label noise lies inside the clean faces' angles, where no threshold tells it
    # (45% confusable noise, seed 10: recall 0.70 after two rounds with the threshold alone);
    # such a face is nearer the look-alike's own centre (cleaning/denoise.IntraClassOutliers).
    # With it, each identity's centre is set on its own person across identities first: a
    # look-alike can outnumber a folder's own person (IntraClassOutliers._person_centres).
    nearer_another_identity: bool = setting(True, doc=(
        "faces nearer another identity's centre than their own are label noise too (centres set "
        "on each identity's own person across identities)"))
    # Below that, an identity's centre is not trusted.
    min_images_to_judge: int = setting(5, range="[1, inf)", doc=(
        "identities with fewer faces keep them unjudged"))
    # A class needs faces to learn from.
    min_images_per_identity: int = setting(2, range="[1, inf)", doc=(
        "identities left with fewer faces are dropped"))
    # Use the model's class centres (dominant sub-centre) instead of the embeddings' robust
    # mean; needs a training checkpoint of a model trained on this dataset's labels. (After
    # two bootstrap epochs the class weights are still far from the faces - clean faces sat
    # beyond 50 deg of them at 50% noise - so the embeddings' mean is the default.)
    use_model_centres: bool = setting(False, doc=(
        "judge against the model's class centres instead of the embeddings' robust mean"))
    # Search bound for merging (0: twice the median angle of the kept faces to their own
    # centre). Within it, mutual nearest identities merge only when their faces intermix
    # (cleaning/denoise.MergeIdentities): the same person filed under two ids lay 2-11 deg
    # apart on the demo, distinct look-alikes from 19 deg up at 50% noise.
    merge_max_angle: float = setting(0.0, range=_ANGLE, doc=(
        "search bound for merging identities (0: twice the median angle of the kept faces to their centre)"))
    # ... whose faces cross on average, and whose underlying centres lie within this
    # (cleaning/denoise.true_centre_cos; duplicates 0-2.5 deg on the demo sweep and 8.8 for
    # identities of 6 and 9 faces, look-alikes whose folders hold each other's faces 11.7+,
    # distinct mutual neighbours 26+). The one test of "one person" across stage 2: also for
    # clusters joined into persons (IntraClassOutliers) and evaluation faces that show an
    # identity's person (EvaluationOverlap: over the seed sweep's 60 cases it found the one
    # overlap person the ratio test missed, and no one else).
    # 0 derives it per model: 0.45 of the median angle between identities and their nearest
    # other (cleaning/denoise.derived_same_person_angle), for a bootstrap started from a face
    # model (train.init_backbone), which sets distinct people 0.63 of that median apart or more
    # on the demo and one person filed twice 0.35 or less: the fixed 10 left 3 such pairs apart
    # in the first 7 cases of the seed sweep.
    merge_same_person_angle: float = setting(10.0, range=_ANGLE, doc=(
        "most angle between the underlying centres of two identities (or an identity and "
        "evaluation faces) taken as one person (0: derived from how far apart the model sets the identities)"))
    # An identity is an evaluation person when at least `overlap_min_faces` evaluation faces
    # have it as their nearest identity, within `overlap_max_angle` of its centre and at most
    # half their angle to any other identity, or as many within that angle (one passing the
    # ratio test) show its person (merge_same_person_angle; cleaning/denoise.EvaluationOverlap). 0: the
    # farthest kept face's angle. A fixed 30 let 3 look-alikes in at 50% noise; a radius
    # alone (the kept faces' 90th percentile) missed one of 3 after a second round.
    overlap_max_angle: float = setting(0.0, range=_ANGLE, doc=(
        "most angle of an evaluation face to an identity's centre to count for it (0: the farthest kept face's)"))
    overlap_min_faces: int = setting(3, range="[1, inf)", doc=(
        "evaluation faces nearest an identity that make it an evaluation person (removed)"))
    exclude_identities: str = setting("", doc=(
        "optional file of identity ids (one per line) known to be in the evaluation sets: removed"))
    # `arcface clean-data`: epochs of the bootstrap model trained on stage-1 data (the rest of
    # its recipe is [train]); then retrain on the refined data when `retrain` is set.
    bootstrap_epochs: int = setting(2, range="[1, inf)", doc="`arcface clean-data`: epochs of each bootstrap model")
    # Epochs alone say nothing of how much a model learned: 2 epochs of a 1000-face demo at
    # batch 64 are ~30 SGD steps (20 of them warm-up). With this > 0 the epochs are raised per
    # run until each bootstrap takes that many optimizer steps (the choice and the data size
    # it came from are in bootstrapN.json and the stage-2 manifest's "loop"). Off by default,
    # measured (issue 29, 45% noise): 200 steps lifted the worst uniform seed's recall from
    # 0.40 to 0.93 under the old rounds rule, but a bootstrap that long learns one person
    # filed under two ids apart (their centres 31-50 deg apart where MergeIdentities needs
    # 10: duplicates missed), doubles the loop's time, and with round_decision and
    # nearer_another_identity the 2-epoch bootstrap did better (recall 0.95 and 1.00 on the
    # two worst seeds, against 0.96 and 0.99 with 200 steps, and no missed merge).
    bootstrap_min_steps: int = setting(0, range="[0, inf)", doc=(
        "`arcface clean-data`: each bootstrap model trains at least this many optimizer steps "
        "(epochs raised to reach them; 0: `bootstrap_epochs` only)"))
    # Sub-centres per class of the bootstrap model (sub-centre ArcFace, Deng et al. 2020):
    # a mislabelled face can sit at a sub-centre of its own instead of pulling the identity's
    # embedding towards it. Demo at 50% label noise, threshold 50 deg: recall 0.90 with one
    # centre per class, 0.975 with three (benchmarks/results/refinement_sweep.md).
    bootstrap_subcentres: int = setting(3, range="[1, inf)", doc="sub-centres per class of the bootstrap model")
    # Refinement rounds of `arcface clean-data` (at most). In round 2 a second bootstrap model is
    # trained on round 1's output - labels mostly clean - and judges the stage-1 faces again:
    # a model trained on data that is largely wrong embeds poorly. 40 small identities at 40%
    # noise: recall 0.92 after one round, 0.99 after two (tests/test_denoise.py).
    rounds: int = setting(2, range="[1, inf)", doc="refinement rounds of `arcface clean-data` (at most)")
    # The last round's model was trained on that much wrong (demo: 10% label noise -> 10.5%
    # found, one round; 40% -> 37%, two). Where the round's threshold came from a fallback
    # rule (the clean mode's floor above Otsu's split, or no valley seen) the share beyond
    # Otsu's split decides, and an intermediate round cuts there (cleaning/denoise.
    # round_decision; the decision and its figures are in the stage-2 manifest's "loop").
    another_round_above: float = setting(0.2, range="[0, 1]", doc=(
        "another round only while the last found at least this share of the judged faces mislabelled "
        "(0: always `rounds` rounds)"))
    retrain: bool = setting(False, doc="`arcface clean-data`: train on the refined data at the end ([train] recipe)")
