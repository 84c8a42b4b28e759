"""Hostile and merely large inputs, built here at test time: each costs one reject (or is
kept), never the job; memory per worker stays bounded; the report decodes only what it may."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage
from PIL import Image

from cleaning.detect.weights import have_weights
from dataset import RefinedDataset, storage
from pipelines.stage1_dask import CleanConfig, run_stage1

ASTRONAUT = Path(skimage.__file__).parent / "data" / "astronaut.png"


def radiance_hdr(width: int, height: int) -> bytes:
    """A Radiance RGBE file of a constant colour, run-length encoded: a few MB on disk that
    OpenCV would decode to width x height x 3 float32 (9000 x 9000: 972 MB)."""
    runs = b""
    left = width
    while left:
        n = min(127, left)
        runs += bytes([128 + n, 100])
        left -= n
    line = bytes([2, 2, width >> 8, width & 255]) + runs * 4  # R, G, B, E channels
    return f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n".encode() + line * height


def png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def camera_photo(shift: int) -> bytes:
    """A 4000x3000 JPEG with a large face (the astronaut, upscaled) - an ordinary camera photo."""
    face = cv2.resize(cv2.imread(str(ASTRONAUT)), (2600, 2600), interpolation=cv2.INTER_CUBIC)
    canvas = np.full((3000, 4000, 3), 90, np.uint8)
    canvas[200:2800, 600 + shift:3200 + shift] = face
    return cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()


def reasons(out: Path) -> dict[str, str]:
    t = pq.read_table(out / "rejects", columns=["key", "reason"]).to_pydict()
    return dict(zip(t["key"], t["reason"]))


def test_formats_decoded_outside_the_cap_are_refused_on_their_header(tmp_path):
    """HDR, PFM and PAM (OpenCV decodes them at full size, Pillow cannot size them), even
    named .jpg, are refused before decoding; an image format we do not take (GIF) is named."""
    person = tmp_path / "raw" / "someone"
    person.mkdir(parents=True)
    (person / "bomb.jpg").write_bytes(radiance_hdr(9000, 9000))
    (person / "float.jpg").write_bytes(cv2.imencode(".pfm", np.ones((40, 40, 3), np.float32))[1].tobytes())
    (person / "pam.jpg").write_bytes(b"P7\nWIDTH 30000\nHEIGHT 30000\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n"
                                     + b"\0" * 1000)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "GIF")
    (person / "anim.jpg").write_bytes(buf.getvalue())  # a GIF named .jpg
    started = time.perf_counter()
    cfg = CleanConfig(records_per_partition=50, workers=1, memory_limit="1GiB")
    manifest = run_stage1(str(tmp_path / "raw"), "image-folder", RefinedDataset.create(tmp_path / "out"), cfg)
    assert time.perf_counter() - started < 120
    got = reasons(tmp_path / "out")
    assert got == {"someone/bomb.jpg": "undecodable", "someone/float.jpg": "undecodable",
                   "someone/pam.jpg": "undecodable", "someone/anim.jpg": "unsupported_format"}
    c = manifest.manifest.counts
    assert c["read"] == 4 == c["rejected"] and c["kept"] == 0
    assert storage.exists(manifest.report_index)


@pytest.mark.skipif(not have_weights(), reason="MTCNN weights not fetched (make setup)")
def test_an_identity_of_camera_photos_finishes_under_a_worker_memory_limit(tmp_path):
    """Eight 4000x3000 photos of one person beside a 9000x9000 HDR bomb: detection runs on
    1280-px copies and decoded photos are held in chunks, so a 1.5 GiB worker is enough
    (before, the whole identity went to MTCNN at full size: 1.15 GB of float input alone)."""
    person = tmp_path / "raw" / "camera"
    person.mkdir(parents=True)
    for i in range(8):
        (person / f"IMG_{i:04d}.jpg").write_bytes(camera_photo(shift=37 * i))
    (tmp_path / "raw" / "other").mkdir()
    (tmp_path / "raw" / "other" / "bomb.jpg").write_bytes(radiance_hdr(9000, 9000))
    cfg = CleanConfig(records_per_partition=50, workers=1, memory_limit="1.5GiB")
    out = run_stage1(str(tmp_path / "raw"), "image-folder", RefinedDataset.create(tmp_path / "out"), cfg)
    c = out.manifest.counts
    assert c["read"] == 9 == c["kept"] + c["rejected"]
    assert 0 < out.manifest.extra["worker_peak_rss_mib"] < 1536  # the worker's peak, under its limit
    got = reasons(tmp_path / "out")
    assert got.pop("other/bomb.jpg") == "undecodable"
    assert c["kept"] >= 1 and set(got.values()) <= {"near_duplicate"}  # one photo, shifted: kept once
    kept = pq.read_table(tmp_path / "out" / "shards", columns=["landmarks", "box", "face_choice"]).to_pylist()
    for row in kept:  # landmarks in full-resolution pixels (mapped back from the bounded copy)
        lm = np.array(row["landmarks"]).reshape(5, 2)
        assert 600 < lm[:, 0].min() and lm[:, 0].max() < 3500 and 200 < lm[:, 1].min() < 2800


def test_the_report_never_decodes_a_bomb_it_shows(tmp_path):
    """A 30000x30000 PNG bomb lands in rejects/ with its bytes; the report shows a placeholder
    for it instead of decoding 2.7 GB, and finishes quickly."""
    from cleaning.report import decode_thumbnail_source

    bomb = png_bomb(30000, 30000)
    assert decode_thumbnail_source(bomb) is None
    assert decode_thumbnail_source(radiance_hdr(9000, 9000)) is None
    ok = cv2.imencode(".jpg", np.full((50, 50, 3), 128, np.uint8))[1].tobytes()
    assert decode_thumbnail_source(ok).shape == (50, 50, 3)
    person = tmp_path / "raw" / "someone"
    person.mkdir(parents=True)
    (person / "bomb.png").write_bytes(bomb)
    started = time.perf_counter()
    out = run_stage1(str(tmp_path / "raw"), "image-folder", RefinedDataset.create(tmp_path / "out"),
                         CleanConfig(records_per_partition=50, workers=1))
    assert reasons(tmp_path / "out") == {"someone/bomb.png": "too_many_pixels"}
    assert storage.exists(out.report_index) and time.perf_counter() - started < 120


def test_a_failed_report_is_an_error_not_a_success(tmp_path, monkeypatch, capsys):
    import cleaning.report

    from pipelines.cli import _report_status

    person = tmp_path / "raw" / "someone"
    person.mkdir(parents=True)
    (person / "text.jpg").write_text("not an image")
    out_dir = tmp_path / "out"
    first = run_stage1(str(tmp_path / "raw"), "image-folder", RefinedDataset.create(out_dir),
                           CleanConfig(records_per_partition=50, workers=1))
    assert storage.exists(first.report_index) and _report_status(first) == 0

    def broken(ds):
        raise RuntimeError("no room for the report")

    monkeypatch.setattr(cleaning.report, "write_report", broken)
    again = run_stage1(str(tmp_path / "raw"), "image-folder", RefinedDataset.create(out_dir),
                           CleanConfig(records_per_partition=50, workers=1))
    assert not storage.exists(again.report_index)  # the earlier run's report does not pass for this one's
    assert _report_status(again) == 1
    assert "could not be written" in capsys.readouterr().err


def _folder_dataset(root: Path, identities: dict[str, int], seed: int = 0) -> None:
    """image-folder input: identity -> number of (distinct, face-free) small photos."""
    rng = np.random.default_rng(seed)
    for ident, n in identities.items():
        (root / ident).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 255, (60, 60, 3), np.uint8)
            (root / ident / f"{i:03d}.jpg").write_bytes(cv2.imencode(".jpg", img)[1].tobytes())


def _reject_rows(out: Path) -> list[tuple]:
    t = pq.read_table(out / "rejects", columns=["key", "reason"]).to_pydict()
    return sorted(zip(t["key"], t["reason"]))


def test_a_rerun_after_a_config_or_input_change_equals_a_fresh_run(tmp_path):
    """Finished partitions are reused only when their fingerprint (records, input listing,
    config, code) matches: a changed threshold or an added identity redoes what it touches,
    and the result is what a fresh run gives - no stale rows, no missing identity."""
    raw = tmp_path / "raw"
    _folder_dataset(raw, {"a": 3, "b": 3})
    cfg = CleanConfig(records_per_partition=1, workers=1)  # one identity per partition
    out = tmp_path / "out"
    first = run_stage1(str(raw), "image-folder", RefinedDataset.create(out), cfg)
    assert first.manifest.counts["read"] == 6
    # input change: identity c added, a photo of a removed
    _folder_dataset(raw, {"c": 2}, seed=1)
    (raw / "a" / "000.jpg").unlink()
    again = run_stage1(str(raw), "image-folder", RefinedDataset.create(out), cfg)
    fresh = run_stage1(str(raw), "image-folder", RefinedDataset.create(tmp_path / "fresh"), cfg)
    assert again.manifest.counts == fresh.manifest.counts and again.manifest.counts["read"] == 7
    assert again.content_hash == fresh.content_hash
    assert _reject_rows(out) == _reject_rows(tmp_path / "fresh")
    # config change: the new recipe is in every partition
    cfg2 = CleanConfig(records_per_partition=1, workers=1, max_pixels=1000)  # 60x60 = 3600 pixels: over it
    (out / "staging" / "part-00000.parquet.tmp-0123abcd").write_bytes(b"cut short by a kill")
    changed = run_stage1(str(raw), "image-folder", RefinedDataset.create(out), cfg2)
    assert not list(out.rglob("*.tmp-*")), "a killed write's temp file is cleaned on the next run"
    assert set(r for _, r in _reject_rows(out)) == {"too_many_pixels"}
    assert changed.manifest.counts["by_reason"] == {"decode/too_many_pixels": 7}
    # fewer partitions than before: the earlier plan's files are gone
    for ident in ("b", "c"):
        for f in (raw / ident).iterdir():
            f.unlink()
        (raw / ident).rmdir()
    run_stage1(str(raw), "image-folder", RefinedDataset.create(out), cfg2)
    assert sorted(p.name for p in (out / "rejects").iterdir()) == ["part-00000.parquet"]


def test_output_folder_hazards_are_refused_in_one_line(tmp_path):
    from pipelines.cli import main

    raw = tmp_path / "raw"
    _folder_dataset(raw, {"a": 2})
    cmd = ["stage1", "--input", str(raw), "--format", "image-folder", "--set", "clean.workers=1"]
    assert main(cmd + ["--out", str(raw / "out")]) == 1  # inside the input: the next run would read it
    assert main(cmd + ["--out", str(tmp_path)]) == 1  # holding the input
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    assert main(cmd + ["--out", str(foreign)]) == 1
    assert (foreign / "thesis.tex").read_text() == "keep me" and sorted(os.listdir(foreign)) == ["thesis.tex"]
    assert main(cmd + ["--out", str(tmp_path / "ok")]) == 0
    other = tmp_path / "raw2"
    _folder_dataset(other, {"z": 2}, seed=3)
    assert main(["stage1", "--input", str(other), "--format", "image-folder", "--set", "clean.workers=1",
                 "--out", str(tmp_path / "ok")]) == 1  # a dataset refined from other input
    assert main(["stage1", "--input", str(other), "--format", "image-folder", "--set", "clean.workers=1",
                 "--out", str(tmp_path / "ok"), "--overwrite"]) == 0
    assert RefinedDataset.open(str(tmp_path / "ok")).manifest.source["uri"] == str(other)


def big_png(width: int, height: int) -> bytes:
    """A valid PNG of a flat grey picture: small on disk, width x height x 3 bytes decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(1)
    row = b"\0" + b"\x80" * (3 * width)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.timeout(300)  # 17 s here; a hang must not eat the suite's budget
def test_a_record_that_kills_its_worker_costs_only_itself(tmp_path):
    """A photo under the pixel cap (raised here) but over the worker's memory kills every
    worker that decodes it. The partition is split until that record is alone; it becomes a
    `resource/worker_lost` reject and every other record of the partition is processed."""
    person = tmp_path / "raw" / "someone"
    person.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        (person / f"{i}.jpg").write_bytes(cv2.imencode(".jpg", rng.integers(0, 255, (60, 60, 3), np.uint8))[1].tobytes())
    # 507 MB decoded (and under PIL's own 179 MP bomb line), held twice (BGR, then RGB): past
    # the 855 MiB restart line on every machine, while a worker that processed good records
    # peaks at 400 MiB here and 520 MiB in CI.
    (person / "2b_huge.png").write_bytes(big_png(13000, 13000))
    # Should Dask lose the task with its worker (dask/distributed#4001; CI hung three times
    # here), the stall watchdog splits it instead: the record is then rejected as `stalled`.
    # Each lost level costs one stall, so 25 s (the test's record takes up to 5 of them).
    cfg = CleanConfig(records_per_partition=50, workers=1, memory_limit="900MiB", max_pixels=200_000_000,
                      stall_seconds=25)
    out = run_stage1(str(tmp_path / "raw"), "image-folder", RefinedDataset.create(tmp_path / "out"), cfg)
    c = out.manifest.counts
    assert c["read"] == 6 == c["kept"] + c["rejected"]
    got = reasons(tmp_path / "out")
    assert got.pop("someone/2b_huge.png") in {"worker_lost", "stalled"}
    assert set(got) == {f"someone/{i}.jpg" for i in range(5)}  # processed (no face in noise), not lost
    assert set(got.values()) == {"no_face"}
    assert c["by_reason"].get("resource/worker_lost", 0) + c["by_reason"].get("resource/stalled", 0) == 1


def _inject_into_workers(monkeypatch, plugin) -> None:
    """Stage 1's Dask workers get `plugin` (a fault of tests/stage1_hooks.py), restarted ones too."""
    from pipelines import stage1_dask

    make_client = stage1_dask._client

    def client_with_the_fault(scheduler, cfg):
        client, cluster = make_client(scheduler, cfg)
        client.register_plugin(plugin)
        return client, cluster

    monkeypatch.setattr(stage1_dask, "_client", client_with_the_fault)


@pytest.mark.timeout(300)
def test_a_record_that_hangs_its_worker_costs_only_itself(tmp_path, monkeypatch):
    """A decoder that never returns on one file (injected into the workers): when no partition
    finishes for clean.stall_seconds, the stuck partition's worker is restarted and the
    partition split, until the record is alone and, at its second stall, rejected as
    `resource/stalled`. The hanging record shares its partition with one good record: one
    split, then its two strikes. Each stall costs stall_seconds and a worker restart (about
    27 s here), so every record more costs the suite time, not coverage."""
    from stage1_hooks import DecoderHangsOn

    _inject_into_workers(monkeypatch, DecoderHangsOn("hangs.jpg"))
    raw = tmp_path / "raw"
    _folder_dataset(raw, {"a": 2, "b": 1})
    (raw / "a" / "001.jpg").rename(raw / "a" / "001hangs.jpg")
    # Long enough for a partition of good records on a freshly restarted worker (it loads torch
    # and the detector first: 4 s failed once here beside other tests), short for the test.
    cfg = CleanConfig(records_per_partition=50, workers=1, stall_seconds=20)
    out = run_stage1(str(raw), "image-folder", RefinedDataset.create(tmp_path / "out"), cfg)
    c = out.manifest.counts
    assert c["read"] == 3 == c["kept"] + c["rejected"]
    got = reasons(tmp_path / "out")
    assert got.pop("a/001hangs.jpg") == "stalled"
    assert len(got) == 2 and set(got.values()) == {"no_face"}  # processed (no face in noise), not lost


@pytest.mark.timeout(300)
def test_a_cluster_left_with_no_worker_gets_new_ones(tmp_path, monkeypatch):
    """A worker whose nanny gives up (it died while the nanny was restarting it: a CI run lost
    its only worker so) leaves our cluster with none. At the next stall the driver starts new
    workers; the pending partition runs again on them and no record is blamed."""
    from stage1_hooks import NannyGivesUpOn

    _inject_into_workers(monkeypatch, NannyGivesUpOn("gone.jpg", str(tmp_path / "it-happened")))
    raw = tmp_path / "raw"
    _folder_dataset(raw, {"a": 4, "b": 2})
    (raw / "a" / "001.jpg").rename(raw / "a" / "001gone.jpg")
    cfg = CleanConfig(records_per_partition=50, workers=1, stall_seconds=10)
    out = run_stage1(str(raw), "image-folder", RefinedDataset.create(tmp_path / "out"), cfg)
    assert (tmp_path / "it-happened").exists()
    c = out.manifest.counts
    assert c["read"] == 6 == c["kept"] + c["rejected"]
    assert set(reasons(tmp_path / "out").values()) == {"no_face"}  # processed, none blamed


@pytest.mark.timeout(300)
def test_workers_paused_for_memory_are_not_blamed_on_records(tmp_path):
    """Our own cluster never pauses, not even a worker restarted after a death (the nanny's
    copy of the settings once lost them: a restarted worker paused on its baseline memory and
    good records were rejected as stalled). A user's cluster whose workers are paused fails
    the job with one clear error and rejects no record."""
    import copy

    import dask
    from dask.distributed import LocalCluster

    from pipelines.stage1_dask import _client

    client, cluster = _client(None, CleanConfig(workers=1, memory_limit="1GiB"))
    try:
        pause = lambda dask_worker: dask_worker.memory_manager.memory_pause_fraction  # noqa: E731
        assert list(client.run(pause).values()) == [False]
        client.restart_workers(list(client.scheduler_info()["workers"]))
        assert list(client.run(pause).values()) == [False]
    finally:
        client.close()
        cluster.close()

    raw = tmp_path / "raw"
    _folder_dataset(raw, {"a": 3})
    with dask.config.set({"distributed.worker.memory.pause": 0.01}):  # paused from the start
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                               host="127.0.0.1", memory_limit="4GiB", config=copy.deepcopy(dask.config.config))
    try:
        with pytest.raises(RuntimeError, match="are paused for memory"):
            run_stage1(str(raw), "image-folder", RefinedDataset.create(tmp_path / "out"),
                           CleanConfig(stall_seconds=5), scheduler=cluster.scheduler_address)
    finally:
        cluster.close()
    assert not (tmp_path / "out" / "rejects").exists() or reasons(tmp_path / "out") == {}


def test_a_record_a_step_raises_on_costs_only_itself(tmp_path, monkeypatch):
    """A step, or the detector, that raises on one record (injected into the workers): that
    record is rejected as internal_error with the error in its detail, and every other record
    of its partition and its detection batch is processed. When many records raise, it is a
    bug: the job fails with one clear error and writes no manifest."""
    from pipelines.stage1_dask import TooManyInternalErrors
    from stage1_hooks import StepRaisesOn

    _inject_into_workers(monkeypatch, StepRaisesOn("raises.jpg", width=77))
    raw = tmp_path / "raw"
    _folder_dataset(raw, {"a": 6, "b": 3})
    (raw / "a" / "002.jpg").rename(raw / "a" / "002raises.jpg")
    odd = np.random.default_rng(1).integers(0, 255, (61, 77, 3), np.uint8)  # the detector raises on it
    (raw / "b" / "001.jpg").write_bytes(cv2.imencode(".jpg", odd)[1].tobytes())
    cfg = CleanConfig(records_per_partition=50, workers=1)
    out = run_stage1(str(raw), "image-folder", RefinedDataset.create(tmp_path / "out"), cfg)
    c = out.manifest.counts
    assert c["read"] == 9 == c["kept"] + c["rejected"]
    assert c["by_reason"] == {"detect/no_face": 7, "decode/internal_error": 1, "detect/internal_error": 1}
    t = pq.read_table(tmp_path / "out" / "rejects", columns=["key", "reason", "detail"]).to_pydict()
    detail = dict(zip(t["key"], t["detail"]))
    assert "ValueError in decode: a bug this record triggers" in detail["a/002raises.jpg"]
    assert "IndexError in detection: a detector bug" in detail["b/001.jpg"]

    many = tmp_path / "many"
    _folder_dataset(many, {"c": 12})
    for f in sorted((many / "c").iterdir()):
        f.rename(f.with_name(f.stem + "raises.jpg"))
    with pytest.raises(TooManyInternalErrors, match=r"12 of 12 records \(100.0%\).*decode/internal_error: 12"):
        run_stage1(str(many), "image-folder", RefinedDataset.create(tmp_path / "out2"), cfg)
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_a_stall_always_splits_or_strikes_a_partition():
    """The watchdog's plan: the partitions a worker runs are split, the queued ones go again;
    when Dask runs none of ours (a lost task), all are split; a lone record goes again once
    before it is split (rejected). Repeated stalls therefore always end."""
    from pipelines.stage1_dask import plan_after_stall

    strikes: dict = {}
    plan = plan_after_stall({"a": None, "b": 4, "c": 1}, {"w1": ["a"], "w2": []}, {"w1": ["a"], "w2": ["b"]}, strikes)
    assert (plan.split, plan.again, strikes) == (["a"], ["b", "c"], {})
    # Nothing executing: the assigned-but-queued ones are the best guess.
    plan = plan_after_stall({"a": None, "b": 4}, {"w1": []}, {"w1": ["b"]}, strikes)
    assert (plan.split, plan.again) == (["b"], ["a"])
    # A worker still runs a task we no longer hold (cancelled, stuck): not ours, so unknown.
    plan = plan_after_stall({"a": None, "b": 1}, {"w1": ["old"]}, {"w1": ["old"]}, strikes)
    assert (plan.split, plan.again, strikes) == (["a"], ["b"], {"b": 1})
    # The lone record's second stall (the driver carries its strikes to its new key): split.
    plan = plan_after_stall({"b2": 1, "d": 2}, {"w1": []}, {"w1": []}, {"b2": 1})
    assert (plan.split, plan.again) == (["b2", "d"], [])
    # A lone record that a worker runs gets its second chance too (a slow restarted worker).
    strikes = {}
    plan = plan_after_stall({"s": 1, "t": 3}, {"w": ["s"]}, {"w": ["s"]}, strikes)
    assert (plan.split, plan.again, plan.suspects, strikes) == ([], ["s", "t"], ["s"], {"s": 1})
    # Partitions not yet counted are counted first: a lone record among them goes again too.
    strikes = {}
    plan = plan_after_stall({"e": None, "f": None}, {"w1": []}, {"w1": []}, strikes, count={"e": 1, "f": 5}.get)
    assert (plan.split, plan.again, plan.counted, strikes) == (["f"], ["e"], {"e": 1, "f": 5}, {"e": 1})

    # Stalling forever on a lost 6-record partition ends, in a bounded number of stalls, with
    # every record rejected exactly once (the driver's bookkeeping, played here by hand).
    pending, strikes, rejected, stalls = {"p": (0, 6)}, {}, [], 0
    while pending:
        stalls += 1
        plan = plan_after_stall({k: hi - lo for k, (lo, hi) in pending.items()}, {"w": []}, {"w": []}, strikes)
        nxt = {}
        for key in plan.split:
            lo, hi = pending[key]
            if hi - lo == 1:
                rejected.append(lo)
            else:
                mid = (lo + hi) // 2
                nxt[f"{key}L"], nxt[f"{key}R"] = (lo, mid), (mid, hi)
        for key in plan.again:
            nxt[f"{key}'"] = pending[key]
            strikes[f"{key}'"] = strikes.pop(key)
        pending = nxt
    assert sorted(rejected) == list(range(6)) and stalls <= 5


def test_every_directory_entry_is_accounted_for(tmp_path):
    """Links, folders named like images, FIFOs, nested folders, files at the root, hidden
    files: each is a reject with its reason; a link out of the input is never read."""
    secret = tmp_path / "host_secret.jpg"
    secret.write_bytes(b"\xff\xd8 HOST SECRET BYTES \xff\xd9")
    raw = tmp_path / "raw"
    _folder_dataset(raw, {"a": 2})
    a = raw / "a"
    (a / "dangling.jpg").symlink_to(a / "gone.jpg")  # within the input, to nothing
    (a / "outside.jpg").symlink_to(secret)
    (a / "inside.jpg").symlink_to(a / "000.jpg")  # a link within the input is read like a file
    (a / "folder.jpg").mkdir()
    (a / "nested").mkdir()
    (a / "nested" / "deep.jpg").write_bytes((a / "001.jpg").read_bytes())
    os.mkfifo(a / "pipe.jpg")
    (a / ".DS_Store").write_bytes(b"junk")
    (raw / "loose.jpg").write_bytes((a / "001.jpg").read_bytes())
    out = run_stage1(str(raw), "image-folder", RefinedDataset.create(tmp_path / "out"),
                         CleanConfig(records_per_partition=50, workers=1))
    got = reasons(tmp_path / "out")
    assert {k: v for k, v in got.items() if k in {"a/dangling.jpg", "a/outside.jpg", "a/folder.jpg", "a/nested",
                                                   "a/pipe.jpg", "a/.DS_Store", "loose.jpg"}} == {
        "a/dangling.jpg": "not_a_regular_file", "a/outside.jpg": "link_outside_input",
        "a/folder.jpg": "nested_folder", "a/nested": "nested_folder", "a/pipe.jpg": "not_a_regular_file",
        "a/.DS_Store": "hidden_file", "loose.jpg": "outside_identity_folder"}
    assert got["a/inside.jpg"] == "exact_duplicate"  # read, and found to be 000.jpg again
    c = out.manifest.counts
    assert c["read"] == 10 == c["kept"] + c["rejected"]
    stored = pq.read_table(tmp_path / "out" / "rejects", columns=["image"]).column("image").to_pylist()
    assert not any(b and b"HOST SECRET" in b for b in stored)


def test_vggface2_files_sharing_a_key_are_ambiguous(tmp_path):
    root = tmp_path / "vgg"
    (root / "train" / "n000001").mkdir(parents=True)
    (root / "bb_landmark").mkdir()
    face = cv2.imencode(".jpg", np.full((80, 80, 3), 120, np.uint8))[1].tobytes()
    (root / "train" / "n000001" / "0001_01.jpg").write_bytes(face)
    (root / "train" / "n000001" / "0001_01.png").write_bytes(cv2.imencode(".png", np.zeros((80, 80, 3), np.uint8))[1])
    (root / "bb_landmark" / "loose_bb_train.csv").write_text("NAME_ID,X,Y,W,H\nn000001/0001_01,10,10,60,60\n")
    (root / "bb_landmark" / "loose_landmark_train.csv").write_text(
        "NAME_ID," + ",".join(f"P{k}{a}" for k in range(1, 6) for a in "XY") + "\n"
        "n000001/0001_01,30,35,50,35,40,45,32,55,48,55\n")
    out = run_stage1(str(root), "vggface2", RefinedDataset.create(tmp_path / "out"),
                         CleanConfig(records_per_partition=50, workers=1))
    assert reasons(tmp_path / "out") == {"n000001/0001_01.jpg": "ambiguous_key", "n000001/0001_01.png": "ambiguous_key"}
    assert out.manifest.counts["read"] == 2
