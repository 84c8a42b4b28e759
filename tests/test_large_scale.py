"""Large-scale engine: blockwise verification and identification equal brute force on sets
small enough to score whole (every size, block size, tile size and tie pattern below), in
the driver and as Ray tasks; each protocol adapter end to end on its synthetic release."""

import numpy as np
import pytest
import torch

from arcface_core import large_scale as core
from arcface_core.metrics import identification_rank1, open_set_identification, tar_at_far
from pipelines import large_scale as ls

FARS = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5, 1.0)


def quantised(n, rng, identities=None, dim=64, nonzero=16):
    """Rows of 16 entries +-1/4 (norm exactly 1): every score is a multiple of 1/16, exact in
    float32 and float64 alike, so scores tie a lot. Rows of one identity share most entries."""
    ids = rng.integers(0, identities, n) if identities else np.arange(n)
    protos = {}
    out = np.zeros((n, dim), np.float32)
    for i, ident in enumerate(ids):
        if ident not in protos:
            protos[ident] = (rng.choice(dim, nonzero, replace=False), rng.choice([-0.25, 0.25], nonzero))
        cols, signs = protos[ident]
        cols, signs = cols.copy(), signs.copy()
        flip = rng.random(nonzero) < 0.3  # some entries of the prototype change
        signs[flip] *= -1
        out[i, cols] = signs
    return out, ids.astype(np.int64)


def continuous(n, rng, identities, dim=32, spread=0.7):
    centres = rng.standard_normal((identities, dim))
    ids = rng.integers(0, identities, n)
    return (centres[ids] + spread * rng.standard_normal((n, dim))).astype(np.float32), ids.astype(np.int64)


def brute_all_to_all(features, labels, fars):
    x = core.normalize(features)
    scores = core.similarity(x, x).numpy()
    i, j = np.triu_indices(len(features), 1)
    same = (labels[i] == labels[j]) & (labels[i] >= 0)
    return tar_at_far(scores[i, j].astype(np.float64), same, fars)


def brute_cross(left, left_labels, right, right_labels, fars):
    scores = core.similarity(core.normalize(left), core.normalize(right)).numpy().ravel()
    same = ((left_labels[:, None] == right_labels[None, :]) & (left_labels[:, None] >= 0)).ravel()
    return tar_at_far(scores.astype(np.float64), same, fars)


# -- the threshold rule ----------------------------------------------------------------------

def test_allowed_false_accepts_is_tar_at_fars_own_test():
    assert core.allowed_false_accepts(1e-3, 999) is None  # finer than 1/n: not measurable
    assert core.allowed_false_accepts(1e-3, 1000) == 1
    assert core.allowed_false_accepts(3e-4, 10_000) == 3  # 3/10000 vs 3e-4 in float64: the tolerance keeps 3
    assert core.allowed_false_accepts(1.0, 7) == 7
    for n in (10, 977, 10_000, 123_457):
        for far in (1e-4, 3e-4, 1e-3, 0.01, 0.07, 0.5):
            m = core.allowed_false_accepts(far, n)
            if m is None:
                continue
            assert m / n <= far + 1e-12 and (m == n or (m + 1) / n > far + 1e-12)


def test_radix_keys_order_like_the_scores_and_decode_back():
    values = torch.tensor([-1.0, -0.5, -1e-30, 0.0, 1e-30, 0.25, 0.9999999, 1.0, 1.0000001], dtype=torch.float32)
    keys = core.ordered_keys(values)
    assert torch.all(keys[1:] > keys[:-1])
    assert [core.key_value(int(k)) for k in keys] == values.tolist()
    assert int(core.ordered_keys(torch.tensor([-0.0]))[0]) == int(core.ordered_keys(torch.tensor([0.0]))[0])


def test_kth_largest_bin_hand_computed():
    counts = np.array([5, 0, 2, 3])  # bins 0..3, ascending values
    assert core.kth_largest_bin(counts, 1) == (3, 1)
    assert core.kth_largest_bin(counts, 3) == (3, 3)
    assert core.kth_largest_bin(counts, 4) == (2, 1)
    assert core.kth_largest_bin(counts, 6) == (0, 1)


def test_hand_computed_verification_with_ties():
    # 4 images: a, a, b, distractor. Scores by construction (unit vectors in 2-D):
    feats = np.array([[1, 0], [1, 0], [0.6, 0.8], [0.6, -0.8]], np.float32)
    labels = np.array([0, 0, 1, -1])
    # pairs: (0,1) genuine 1.0; impostors (0,2) .6 (0,3) .6 (1,2) .6 (1,3) .6 (2,3) -.28
    fs = ls.FeatureSet.from_array(feats, labels, block_size=3)
    result = ls.verify([ls.PairSpace(fs)], (0.2, 0.8, 1.0), runner=ls.LocalRunner())
    assert (result.genuine, result.impostors) == (1, 5)
    # FAR 0.2 allows 1 false accept: the four tied 0.6 cannot be split, threshold above them; TAR 1
    # (the genuine 1.0 is above). FAR 0.8 allows 4: threshold above -0.28 accepts all four 0.6 too.
    assert result.tar == {0.2: 1.0, 0.8: 1.0, 1.0: 1.0}
    assert result.thresholds[0.2] == pytest.approx(0.6) and result.thresholds[0.8] == pytest.approx(-0.28)
    assert result.thresholds[1.0] == float("-inf")
    assert result.tar == brute_all_to_all(feats, labels, (0.2, 0.8, 1.0))


# -- verification equals brute force -------------------------------------------------------

@pytest.mark.parametrize("n,identities,block,tile", [(37, 5, 7, 50), (200, 20, 64, 1000), (513, 60, 100, 20000),
                                                     (300, 300, 1000, 1 << 24)])
@pytest.mark.parametrize("kind", ["quantised", "continuous"])
def test_all_to_all_equals_brute_force(n, identities, block, tile, kind):
    rng = np.random.default_rng(n + block)
    if kind == "quantised":
        feats, labels = quantised(n, rng, identities)
    else:
        feats, labels = continuous(n, rng, identities)
    labels[rng.random(n) < 0.2] = -1  # distractors: nobody's mates, not even each other's
    expected = brute_all_to_all(feats, labels, FARS)
    fs = ls.FeatureSet.from_array(feats, labels, block_size=block)
    for limit in (10**9, 3):  # kept top-k; radix selection for every k above 3
        result = ls.verify([ls.PairSpace(fs)], FARS, runner=ls.LocalRunner(), topk_limit=limit, tile_elements=tile)
        assert result.tar == expected, (limit, result.tar, expected)
    assert set(expected) == {f for f in FARS if f >= 1 / result.impostors}


@pytest.mark.parametrize("p,g,block", [(23, 57, 10), (64, 300, 128)])
def test_probes_by_gallery_equals_brute_force(p, g, block):
    rng = np.random.default_rng(p)
    feats, labels = quantised(p + g, rng, 12)
    labels[p + 10:] = -1  # most of the gallery are distractors
    left, right = ls.FeatureSet.from_array(feats[:p], labels[:p], block), ls.FeatureSet.from_array(feats[p:], labels[p:], block)
    expected = brute_cross(feats[:p], labels[:p], feats[p:], labels[p:], FARS)
    for limit in (10**9, 2):
        result = ls.verify([ls.PairSpace(left, right)], FARS, runner=ls.LocalRunner(), topk_limit=limit,
                           tile_elements=3001)
        assert result.tar == expected


def test_genuine_only_space_adds_genuine_pairs_but_no_impostors():
    # MegaFace: genuine pairs among the probes, impostors only probe x distractor.
    rng = np.random.default_rng(5)
    probes, plabels = quantised(30, rng, 6)
    distractors, _ = quantised(80, rng)
    dlabels = -np.ones(80, np.int64)
    x, d = core.normalize(probes), core.normalize(distractors)
    i, j = np.triu_indices(30, 1)
    same = plabels[i] == plabels[j]
    genuine = core.similarity(x, x).numpy()[i, j][same]
    impostor = core.similarity(x, d).numpy().ravel()
    expected = tar_at_far(np.r_[genuine, impostor].astype(np.float64), np.r_[np.ones(len(genuine), bool),
                                                                            np.zeros(len(impostor), bool)], FARS)
    pf, df = ls.FeatureSet.from_array(probes, plabels, 7), ls.FeatureSet.from_array(distractors, dlabels, 25)
    result = ls.verify([ls.PairSpace(pf, impostors=False), ls.PairSpace(pf, df)], FARS, runner=ls.LocalRunner(),
                       topk_limit=4)
    assert result.tar == expected and result.impostors == 30 * 80 and result.genuine == same.sum()


# -- identification equals brute force ------------------------------------------------------

def test_open_set_hand_computed():
    gallery = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], np.float32)
    probes = np.array([[1, .2, 0, 0], [.5, .4, 0, 0], [0, 0, 1, 0], [.3, .3, 0, 1], [0, .9, 0, .1]], np.float32)
    g = ls.FeatureSet.from_array(gallery, [0, 1, 2], 2)
    p = ls.FeatureSet.from_array(probes, [0, 1, 2, 7, 8], 2)
    found = ls.search(p, g, k=2, runner=ls.LocalRunner())
    r = core.open_set_from_search(found, np.array([1, 1, 1, 0, 0], bool), ranks=(1, 2), fpirs=(0.5, 0.1))
    assert r.cmc == {1: pytest.approx(2 / 3), 2: 1.0}
    assert r.tpir == {0.5: pytest.approx(2 / 3)}  # threshold just above 0.29: probes a and c pass
    wide = ls.search(p, g, k=3, runner=ls.LocalRunner())
    assert wide.top_index[1].tolist() == [0, 2, -1]  # probe b: two non-mates, then padding (its mate is no non-mate)
    assert wide.top_scores[1, 2] == float("-inf") and wide.mate[1] == pytest.approx(0.4 / np.hypot(.5, .4))


@pytest.mark.parametrize("p,g,block,k", [(40, 90, 16, 5), (120, 400, 1000, 10), (33, 77, 10, 3)])
def test_open_set_equals_brute_force(p, g, block, k):
    rng = np.random.default_rng(p * g)
    gallery, glabels = quantised(g, rng, 25)
    glabels[30:] = -1  # distractors
    probes, plabels = quantised(p, rng, 35)  # identities 25..34 are not in the gallery: non-mated
    fpirs = (0.01, 0.05, 0.1, 0.3, 0.5)
    names = lambda labels, tag: np.array([f"{tag}{i}" if v < 0 else str(v) for i, v in enumerate(labels)])
    expected = open_set_identification(gallery, names(glabels, "d"), probes, names(plabels, "x"), (1, 2, k), fpirs)
    found = ls.search(ls.FeatureSet.from_array(probes, plabels, block), ls.FeatureSet.from_array(gallery, glabels, block),
                      k=k, runner=ls.LocalRunner(), tile_elements=64)
    got = core.open_set_from_search(found, np.isin(plabels, glabels[glabels >= 0]), (1, 2, k), fpirs)
    assert got.cmc == expected.cmc and got.tpir == expected.tpir
    assert (got.mated, got.non_mated) == (expected.mated, expected.non_mated)
    # the kept indices point at the scores they claim
    sims = core.similarity(core.normalize(probes), core.normalize(gallery))
    valid = found.top_index >= 0
    assert torch.equal(sims.gather(1, found.top_index.clamp(min=0))[valid], found.top_scores[valid])


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_megaface_rank1_equals_brute_force(block):
    rng = np.random.default_rng(block)
    probes, plabels = quantised(40, rng, 8)
    distractors, _ = quantised(150, rng)
    expected = identification_rank1(probes, plabels, distractors)
    top = ls.search(ls.FeatureSet.from_array(probes, plabels, block),
                    ls.FeatureSet.from_array(distractors, -np.ones(150, np.int64), block), k=3, runner=ls.LocalRunner())
    got = core.megaface_ranks(core.normalize(probes), plabels, top.top_scores, ranks=(1, 3))
    assert got.cmc[1] == expected.rank1 and got.trials == expected.probes
    assert got.cmc[3] >= got.cmc[1]


# -- shards and Ray ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_feature_shards_read_back_in_blocks(tmp_path, fmt):
    rng = np.random.default_rng(0)
    feats, labels = continuous(250, rng, 9)
    ls.write_features(str(tmp_path), feats, labels, shard_rows=100, fmt=fmt)
    fs = ls.open_features(str(tmp_path), block_size=40)
    assert [len(b) for b in fs.blocks] == [40, 40, 20] * 2 + [40, 10]  # no block straddles a shard
    np.testing.assert_array_equal(np.concatenate([ls.read_block(b) for b in fs.blocks]), feats)
    np.testing.assert_array_equal(fs.labels, labels)
    expected = brute_all_to_all(feats, labels, FARS)
    assert ls.verify([ls.PairSpace(fs)], FARS, runner=ls.LocalRunner(), topk_limit=5).tar == expected


def test_feature_shards_on_s3(s3_bucket):
    rng = np.random.default_rng(1)
    feats, labels = continuous(90, rng, 6)
    ls.write_features(f"s3://{s3_bucket}/feats", feats, labels, shard_rows=50, fmt="npy")
    fs = ls.open_features(f"s3://{s3_bucket}/feats", block_size=20)
    np.testing.assert_array_equal(np.concatenate([ls.read_block(b) for b in fs.blocks]), feats)


def test_bad_features_are_refused(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        core.normalize(np.array([[1.0, np.nan]]))
    with pytest.raises(FileNotFoundError, match="no feature shards"):
        ls.open_features(str(tmp_path))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a running cluster
    yield ray
    if started:
        ray.shutdown()


def test_engine_on_ray_equals_brute_force(ray_local, tmp_path):
    rng = np.random.default_rng(3)
    feats, labels = quantised(260, rng, 30)
    labels[200:] = -1
    ls.write_features(str(tmp_path), feats, labels, shard_rows=90, fmt="npy")
    fs = ls.open_features(str(tmp_path), block_size=64)
    runner = ls.RayRunner(cpus=1)
    assert ls.verify([ls.PairSpace(fs)], FARS, runner=runner, topk_limit=6).tar == brute_all_to_all(feats, labels, FARS)
    probes, gallery = fs.blocks[:2], fs.blocks[2:]
    pf = ls.FeatureSet(probes, labels[:len(probes[0]) + len(probes[1])], fs.dim)
    gf = ls.FeatureSet(gallery, labels[len(pf):], fs.dim)
    local = ls.search(pf, gf, 4, runner=ls.LocalRunner())
    remote = ls.search(pf, gf, 4, runner=runner)
    assert torch.equal(local.top_scores, remote.top_scores) and torch.equal(local.mate, remote.mate)


# -- protocol adapters on their synthetic releases ---------------------------------------------

@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    from cleaning.synthetic.large_scale import write_releases

    root = tmp_path_factory.mktemp("large_scale_releases")
    return root, write_releases(root, seed=3)


@pytest.fixture(scope="module")
def embedder():
    from arcface_core.backbones import build_backbone
    from pipelines.evaluate import TorchEmbedder

    torch.manual_seed(0)
    return TorchEmbedder(build_backbone("tiny", 32))


def _embedded(release, embedder):
    embed = ls.local_image_embedder(embedder)
    return {r.name: (embed(r.uris), r.labels) for r in release.roles}


def test_megaface_release_end_to_end(releases, embedder, tmp_path):
    root, info = releases
    release = ls.load_megaface(str(root / "megaface"))
    probes, distractors = release.roles
    assert len(probes.uris) == info["megaface"]["probes"] - 1 == 23  # the noisy FaceScrub image is left out
    assert len(distractors.uris) == info["megaface"]["distractors"] - 2  # noise list and duplicates list
    assert release.info == {"noisy_probes_removed": 1, "noisy_distractors_removed": 2}
    results = ls.run_release("megaface", str(root / "megaface"), ls.local_image_embedder(embedder), work=str(tmp_path),
                             block_size=16, runner=ls.LocalRunner(), out=str(tmp_path / "out"))
    (name, figures), = results.items()
    assert name == release.name and name.startswith("MegaFace-")
    feats = _embedded(release, embedder)
    expected = identification_rank1(feats["probes"][0], feats["probes"][1], feats["distractors"][0])
    assert figures["rank1"] == expected.rank1 and figures["trials"] == expected.probes
    assert figures["rank1"] <= figures["rank5"] <= figures["rank10"]
    assert figures["impostor_pairs"] == 23 * 58 and "tar_at_far_0.001" in figures and "tar_at_far_0.0001" not in figures
    assert (tmp_path / "out" / "megaface.png").stat().st_size > 1000
    # the embedded shards are reused by a second run (same paths): the embedder is not called again
    def refuse(uris):
        raise AssertionError("embedded again")
    again = ls.run_release("megaface", str(root / "megaface"), refuse, work=str(tmp_path), block_size=16,
                           runner=ls.LocalRunner())
    assert {k: v for k, v in again[name].items() if k not in ("roc", "engine_seconds")} == \
        {k: v for k, v in figures.items() if k not in ("roc", "engine_seconds")}


def test_trillion_pairs_release_end_to_end(releases, embedder, tmp_path):
    root, info = releases
    release = ls.load_trillion_pairs(str(root / "trillion-pairs"))
    results = ls.run_release("trillion-pairs", str(root / "trillion-pairs"), ls.local_image_embedder(embedder),
                             work=str(tmp_path), block_size=32, runner=ls.LocalRunner())
    figures = results[release.name]
    feats = _embedded(release, embedder)
    everything = np.concatenate([feats["elfw"][0], feats["distractors"][0]])
    labels = np.r_[feats["elfw"][1], feats["distractors"][1]]
    expected = brute_all_to_all(everything, labels, ls.FARS["trillion-pairs"])
    assert {k: figures[f"tar_at_far_{k:g}"] for k in expected} == expected
    assert not any(k.startswith("tar_at_far_1e-0") and k not in {f"tar_at_far_{f:g}" for f in expected} for k in figures)
    # identification: the open-set protocol with the distractors in the gallery
    gallery_mask, probe_mask = ls.enrolled_split(feats["elfw"][1])
    g = np.concatenate([feats["elfw"][0][gallery_mask], feats["distractors"][0]])
    gl = np.r_[feats["elfw"][1][gallery_mask].astype(str), [f"d{i}" for i in range(len(feats["distractors"][0]))]]
    brute = open_set_identification(g, gl, feats["elfw"][0][probe_mask], feats["elfw"][1][probe_mask].astype(str),
                                    ls.RANKS, ls.FPIRS)
    # float64 brute force vs float32 engine: equal wherever no two scores fall within float32 rounding
    assert figures["rank1"] == pytest.approx(brute.cmc[1], abs=1 / brute.mated)
    assert figures["mated_probes"] == brute.mated and figures["non_mated_probes"] == brute.non_mated
    assert set(k for k in figures if k.startswith("tpir")) == {f"tpir_at_fpir_{f:g}" for f in brute.tpir}


def test_mfr_release_end_to_end(releases, embedder):
    root, info = releases
    release = ls.load_mfr(str(root / "mfr-all"))
    figures = ls.run_release("mfr-all", str(root / "mfr-all"), ls.local_image_embedder(embedder),
                             block_size=20, runner=ls.LocalRunner())[release.name]
    (feats, labels), = _embedded(release, embedder).values()
    expected = brute_all_to_all(feats, labels, ls.FARS["mfr-all"])
    assert {k: figures[f"tar_at_far_{k:g}"] for k in expected} == expected
    assert figures["images"] == info["mfr-all"]["images"] == 48 and figures["genuine_pairs"] == 12 * 6


def test_ytf_release_end_to_end(releases, embedder):
    from arcface_core.metrics import kfold_accuracy, pair_scores

    root, info = releases
    release = ls.load_ytf(str(root / "ytf"))
    figures = ls.run_release("ytf", str(root / "ytf"), ls.local_image_embedder(embedder), block_size=10,
                             runner=ls.LocalRunner())[release.name]
    assert figures["pairs"] == 100 and figures["folds"] == 10
    (frames, video), = _embedded(release, embedder).values()
    from arcface_core.metrics import l2_normalize
    means = np.stack([l2_normalize(frames)[video == v].mean(0) for v in range(video.max() + 1)])
    names = sorted({v for a, b, _, _ in release.pairs for v in (a, b)})
    a = means[[names.index(p[0]) for p in release.pairs]]
    b = means[[names.index(p[1]) for p in release.pairs]]
    expected = kfold_accuracy(pair_scores(a, b), np.array([p[2] for p in release.pairs]))
    assert figures["accuracy"] == pytest.approx(expected.accuracy)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained model as a training checkpoint folder: what `arcface evaluate --model` takes."""
    import dataclasses

    from pipelines.training.config import TrainConfig
    from pipelines.training.step import Trainee

    torch.manual_seed(0)
    trainee = Trainee(TrainConfig(backbone="tiny", embedding_size=32, workers=1), 4, 0, 1, torch.device("cpu"))
    folder = tmp_path_factory.mktemp("model")
    trainee.save(str(folder), {"step": 0, "world": 1, "config": dataclasses.asdict(trainee.cfg)})
    return folder


@pytest.mark.parametrize("protocol", ["megaface", "trillion-pairs", "mfr-all", "ytf"])
def test_each_protocol_runs_from_the_cli(releases, checkpoint, tmp_path, capsys, protocol):
    """`arcface evaluate --protocol P --release DIR` on the synthetic release of each protocol:
    figures printed and written, the curves drawn."""
    import json

    from pipelines.cli import main

    root, _ = releases
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(checkpoint), "--protocol", protocol, "--release", str(root / protocol),
                 "--block-size", "13", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "evaluation.json").read_text())
    (figures,) = written.values()
    wanted = {"megaface": "rank1", "trillion-pairs": "tpir_at_fpir_0.001", "mfr-all": "tar_at_far_1e-06",
              "ytf": "accuracy"}[protocol]
    assert any(k.startswith(wanted.split("_at_")[0]) for k in figures), figures
    assert 0.0 <= next(v for k, v in figures.items() if k.startswith(wanted.split("_at_")[0])) <= 1.0
    assert f"| {next(k for k in figures if k.startswith(wanted.split('_at_')[0]))} |" in printed
    assert (out / f"{protocol}.png").exists()


def test_a_protocol_without_its_release_is_one_line(checkpoint, caplog):
    from pipelines.cli import main

    assert main(["evaluate", "--model", str(checkpoint), "--protocol", "ytf"]) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == ["ValueError: --protocol needs --release DIR"]


def test_release_layout_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="facescrub_lst: missing"):
        ls.load_megaface(str(tmp_path))
    (tmp_path / "splits.txt").write_text("header\n1, a/0, b/0\n")
    with pytest.raises(ValueError, match="line 2 is not"):
        ls.load_ytf(str(tmp_path))
