"""Fail closed (#31): hostile or careless inputs are refused in one line before they cost
memory, hang, train a wrong model or touch files that are not ours. Each case builds its
hostile file here (sparse files with truncate, FIFOs, struct-packed headers) and asserts the
refusal itself; the ones that used to exhaust memory or hang run in a subprocess with its
address space capped (RLIMIT_AS) and a timeout, so a regression fails instead of swapping."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cleaning import readers
from cleaning.formats.recordio import write_rec
from cleaning.readers import IR_HEADER, RecordIOError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_CAP = 2 << 30  # the bound: under 2 GB per process


def run_capped(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose address space is capped at 2 GB."""
    prelude = ("import resource\n"
               f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, timeout=timeout,
                          capture_output=True, text=True)


# -- RecordIO -------------------------------------------------------------------------------

def _rec_folder(tmp_path, order="index"):
    root = tmp_path / "rec"
    items = [(cls, bytes([cls]) * 50) for cls in range(3) for _ in range(4)]
    write_rec(str(root) + "/", items, order=order)
    return root


def _rewrite_header(root, first: float, end: float) -> None:
    """Record 0's identity range replaced in place (its frame and size stay the same)."""
    offsets = dict(line.split("\t") for line in (root / "train.idx").read_text().splitlines())
    at = int(offsets["0"]) + 8 + IR_HEADER.size  # the two float32 labels after frame and header
    with open(root / "train.rec", "r+b") as fh:
        fh.seek(at)
        fh.write(np.array([first, end], np.float32).tobytes())


@pytest.mark.parametrize("order", ["index", "face2rec2"])
@pytest.mark.parametrize("scrambled", [False, True])
def test_an_index_cut_short_is_refused(tmp_path, order, scrambled):
    # Before: a train.idx missing its last lines read 43 of 70 records with only a warning.
    from cleaning import readers

    root = _rec_folder(tmp_path, order)
    lines = (root / "train.idx").read_text().splitlines()
    by_offset = sorted(lines, key=lambda line: int(line.split("\t")[1]))
    kept = [line for line in lines if line not in by_offset[-3:]]  # the last three records in train.rec
    if scrambled:  # the in-memory planner checks the same
        kept = kept[::-1]
    (root / "train.idx").write_text("".join(line + "\n" for line in kept))
    with pytest.raises(readers.RecordIOError, match=r"lists records up to byte \d+ of .*train.rec, which holds "
                                                    r"\d+ bytes: the records after byte"):
        readers.plan("insightface-rec", str(root), 4)


def test_an_index_with_records_left_out_inside_still_plans(tmp_path):
    """face2rec2 leaves out an image it cannot read: a gap inside is no cut-short index."""
    from cleaning import readers

    root = _rec_folder(tmp_path, "index")
    lines = (root / "train.idx").read_text().splitlines()
    (root / "train.idx").write_text("".join(line + "\n" for line in lines if not line.startswith("5\t")))
    records = [s for p in readers.plan("insightface-rec", str(root), 4) for s in readers.read_partition(p)]
    assert len(records) == 11  # 12 images, one left out of the index


PLAN_CODE = """
from cleaning import readers
try:
    readers.plan("insightface-rec", {root!r}, 4)
except readers.RecordIOError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("order", ["index", "face2rec2"])
@pytest.mark.parametrize("claim", [2.0 ** 31, 3e38, float("inf"), float("nan")])
def test_rec_header_claiming_more_identities_than_the_files_hold_is_refused(tmp_path, order, claim):
    # Before: 2^31 grew the planner past 6 GB in 77 s, 3e38 hung, inf was an OverflowError.
    root = _rec_folder(tmp_path, order)
    _rewrite_header(root, 13.0, claim)
    done = run_capped(PLAN_CODE.format(root=str(root)), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "REFUSED" in done.stdout and "record 0 (the header)" in done.stdout, done.stdout + done.stderr[-2000:]
    assert len(done.stdout.strip().splitlines()) == 1


def test_rec_header_within_the_file_sizes_is_planned(tmp_path):
    root = _rec_folder(tmp_path)
    parts = readers.plan("insightface-rec", str(root), 4)
    assert sum(1 for p in parts for s in readers.read_partition(p) if s.reject is None) == 12


def test_rec_header_range_rule_is_the_file_sizes(tmp_path):
    root = _rec_folder(tmp_path)  # 12 images + 3 identities + header: 16 records
    idx, rec = str(root / "train.idx"), str(root / "train.rec")
    fit = min(os.path.getsize(idx) // 4, os.path.getsize(rec) // 32)
    assert readers.check_header_range(np.array([13, fit], np.float32), idx, rec) == (13, fit)
    with pytest.raises(RecordIOError, match="more than train.idx and train.rec can hold"):
        readers.check_header_range(np.array([13, fit + 1], np.float32), idx, rec)
    with pytest.raises(RecordIOError, match="1 <= first <= end"):
        readers.check_header_range(np.array([13, 5], np.float32), idx, rec)
    with pytest.raises(RecordIOError, match="whole numbers"):
        readers.check_header_range(np.array([13.5, 15], np.float32), idx, rec)


def _replace_idx(root, make) -> None:
    (root / "train.idx").unlink()
    make(str(root / "train.idx"))


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "sparse_no_newline"])
def test_rec_index_that_is_not_a_bounded_regular_file_is_refused(tmp_path, kind):
    # Before: /dev/zero or a 50 GB sparse index with no newline took 6-10 GB in seconds; a FIFO hung.
    root = _rec_folder(tmp_path)
    if kind == "dev_zero":
        _replace_idx(root, lambda p: os.symlink("/dev/zero", p))
    elif kind == "fifo":
        _replace_idx(root, os.mkfifo)
    else:
        _replace_idx(root, lambda p: os.truncate(open(p, "wb").name, 50 << 30))
    done = run_capped(PLAN_CODE.format(root=str(root)), timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    rule = "not a regular file" if kind != "sparse_no_newline" else "a line of over 1024 bytes"
    assert "REFUSED" in done.stdout and "train.idx" in done.stdout and rule in done.stdout, done.stdout
    if kind == "sparse_no_newline":
        assert "train.idx:1:" in done.stdout  # the line is named


def test_rec_data_file_that_is_a_fifo_is_refused(tmp_path):
    root = _rec_folder(tmp_path)
    (root / "train.rec").unlink()
    os.mkfifo(root / "train.rec")
    done = run_capped(PLAN_CODE.format(root=str(root)), timeout=30)
    assert "REFUSED" in done.stdout and "train.rec: not a regular file" in done.stdout, done.stdout + done.stderr


def _set_offset(root, key: int, offset: int) -> int:
    """Give record `key`'s index line another offset; returns its line number."""
    lines = (root / "train.idx").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.split("\t")[0] == str(key))
    lines[at] = f"{key}\t{offset}"
    (root / "train.idx").write_text("".join(line + "\n" for line in lines))
    return at + 1


@pytest.mark.parametrize("order", ["index", "face2rec2"])
@pytest.mark.parametrize("offset", [10 ** 12, 2 ** 62, 2 ** 70])
def test_an_index_offset_past_the_end_of_train_rec_is_that_records_reject(tmp_path, order, offset):
    # Before: an offset of 2^70 was an OverflowError traceback (2^62: "OSError: lseek failed").
    root = _rec_folder(tmp_path, order)
    line = _set_offset(root, 5, offset)
    samples = [s for p in readers.plan("insightface-rec", str(root), 4) for s in readers.read_partition(p)]
    rejects = [s.reject for s in samples if s.reject]
    assert len(rejects) == 1 and rejects[0][0] == "corrupt_record", rejects
    # 10^12: a position the file system takes, where train.rec has ended; 2^62 and 2^70: none
    assert re.fullmatch(rf"train.rec#5 \(train.idx:{line}\): offset {offset}: (file ends inside a record header|"
                        r"past the end of train.rec \(.*\))", rejects[0][1]), rejects
    assert len(samples) == 12  # the other 11 images read


@pytest.mark.parametrize("offset", [2 ** 62, 2 ** 70])
def test_a_header_record_past_the_end_of_train_rec_is_refused_naming_it(tmp_path, offset):
    root = _rec_folder(tmp_path)
    _set_offset(root, 0, offset)
    with pytest.raises(RecordIOError, match=rf"train.rec: record 0 \(the header\), listed in .*train.idx: offset "
                                            rf"{offset}: past the end of train.rec"):
        readers.plan("insightface-rec", str(root), 4)


# -- settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", ["clean.workers=1e23", "clean.workers=1025", "clean.stall_seconds=0.001",
                                     "train.lr=100", "train.lr=0", "margin.scale=1e308", "margin.scale=2000",
                                     "train.workers=100000", "denoise.workers=5000"])
def test_settings_outside_their_meaningful_range_are_refused(setting):
    # Before: clean.workers=1e23 and clean.stall_seconds=0.001 were accepted and broke the job;
    # margin.scale=1e308 trained with loss NaN to a checkpoint.
    from pipelines.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=setting.split("=")[0].replace(".", r"\.")):
        load_config(None, [setting])


@pytest.mark.parametrize("setting", ["clean.workers=1024", "clean.stall_seconds=5", "train.lr=10",
                                     "margin.scale=1024", "margin.scale=64"])
def test_settings_at_their_bounds_are_taken(setting):
    from pipelines.config import load_config

    load_config(None, [setting])


# -- training -------------------------------------------------------------------------------

@pytest.fixture
def shard_copy(demo_shards, tmp_path):
    """A private copy of the demo dataset, to damage."""
    import shutil

    out = tmp_path / "data"
    shutil.copytree(demo_shards, out)
    return out


def _relabel(root, change) -> None:
    """Rewrite every shard's label column with change(labels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard in sorted((root / "shards").glob("*.parquet")):
        table = pq.read_table(shard)
        labels = change(table.column("label").to_numpy().copy())
        table = table.set_column(table.schema.get_field_index("label"), "label",
                                 pa.array(labels, table.schema.field("label").type))
        pq.write_table(table, shard)


def _train_cfg(tmp_path, **changes):
    from pipelines.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "demo-train.toml"))
    cfg.train.storage = str(tmp_path / "runs")
    for key, value in changes.items():
        setattr(cfg.train, key, value)
    return cfg


@pytest.mark.parametrize("damage", ["every_other_100000", "all_at_least_c", "negative"])
def test_out_of_range_labels_are_refused_before_any_worker_trains(shard_copy, tmp_path, damage):
    # Before: out-of-range labels became -1 on every shard and trained to a checkpoint.
    from dataset import RefinedDataset
    from pipelines.training.driver import TrainingInputError, check_input

    data = RefinedDataset.open(str(shard_copy))
    c = data.num_classes
    change = {"every_other_100000": lambda y: np.where(np.arange(y.size) % 2 == 0, 100000, y),
              "all_at_least_c": lambda y: y + c,
              "negative": lambda y: np.where(np.arange(y.size) == 3, -1, y)}[damage]
    _relabel(shard_copy, change)
    cfg = _train_cfg(tmp_path)
    with pytest.raises(TrainingInputError, match=r"row group \d+: \d+ of \d+ labels outside 0 \.\. "):
        check_input(RefinedDataset.open(str(shard_copy)), cfg.train, cfg.margin)


def test_num_classes_smaller_than_the_labels_is_refused(shard_copy, tmp_path):
    import json

    from dataset import RefinedDataset
    from pipelines.training.driver import TrainingInputError, check_input

    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["num_classes"] = manifest["num_classes"] // 2
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    cfg = _train_cfg(tmp_path)
    with pytest.raises(TrainingInputError, match=f"outside 0 .. {manifest['num_classes'] - 1}"):
        check_input(RefinedDataset.open(str(shard_copy)), cfg.train, cfg.margin)


@pytest.mark.parametrize("damage", ["missing", "truncated", "rows_removed"])
def test_a_shard_gone_or_changed_is_refused_before_any_worker_trains(shard_copy, tmp_path, damage):
    # Before: a missing shard failed inside every worker, and Ray Train retried it.
    import pyarrow.parquet as pq

    from dataset import RefinedDataset
    from pipelines.training.driver import TrainingInputError, check_input

    shard = sorted((shard_copy / "shards").glob("*.parquet"))[0]
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        table = pq.read_table(shard)
        pq.write_table(table.slice(0, table.num_rows - 1), shard)
    cfg = _train_cfg(tmp_path)
    expected = {"missing": "a shard the manifest lists cannot be read .*FileNotFoundError",
                "truncated": "a shard the manifest lists cannot be read",
                "rows_removed": "the shards hold \\d+ faces, the manifest says \\d+"}[damage]
    with pytest.raises(TrainingInputError, match=expected):
        check_input(RefinedDataset.open(str(shard_copy)), cfg.train, cfg.margin)


def test_the_demo_dataset_passes_the_label_check(demo_shards, tmp_path):
    from dataset import RefinedDataset
    from pipelines.training.data import ShardDataset

    assert ShardDataset(RefinedDataset.open(str(demo_shards))).label_problem() == ""


def test_non_finite_initial_weights_are_refused(demo_shards, tmp_path):
    # Before: --init-backbone with NaN weights trained with loss NaN and wrote a checkpoint.
    import torch

    from arcface_core.backbones import build_backbone
    from dataset import RefinedDataset
    from pipelines.training.driver import TrainingInputError, check_input

    cfg = _train_cfg(tmp_path)
    state = build_backbone(cfg.train.backbone, cfg.train.embedding_size).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name][0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    cfg.train.init_backbone = str(tmp_path / "nan.pth")
    with pytest.raises(TrainingInputError, match=f"nan.pth: {name} holds NaN"):
        check_input(RefinedDataset.open(str(demo_shards)), cfg.train, cfg.margin)
    torch.save(build_backbone(cfg.train.backbone, cfg.train.embedding_size).state_dict(), tmp_path / "ok.pth")
    cfg.train.init_backbone = str(tmp_path / "ok.pth")
    check_input(RefinedDataset.open(str(demo_shards)), cfg.train, cfg.margin)  # a finite one is taken


POISON_HOOK = '''
import gc
import torch


def poison(step, rank, world, run_dir):
    """Fault injection: after step 2 the backbone's weights turn NaN (as a diverging run's would)."""
    if step != 2:
        return
    from pipelines.training.step import Trainee
    for obj in gc.get_objects():
        if isinstance(obj, Trainee):
            with torch.no_grad():
                next(obj.backbone.parameters()).fill_(float("nan"))
'''


@pytest.mark.slow
def test_a_diverging_run_stops_in_one_line_without_retrying_or_a_checkpoint(demo_shards, tmp_path):
    import ray

    from pipelines.training.driver import TrainingDiverged, run_training
    from pipelines.training.loop import STOPPED_FILE

    hook = tmp_path / "poison.py"
    hook.write_text(POISON_HOOK)
    cfg = _train_cfg(tmp_path, name="diverge", workers=1, max_steps=6, checkpoint_every=3, max_failures=3,
                     eval_every=0, batch_size=16)
    cfg.train.eval_sets = ""
    try:
        with pytest.raises(TrainingDiverged, match=r"run diverge: the loss is nan at step 3 .*no checkpoint"):
            run_training(str(demo_shards), cfg.train, cfg.margin, step_hook=f"{hook}:poison")
    finally:
        ray.shutdown()
    run = tmp_path / "runs" / "diverge"
    assert (run / STOPPED_FILE).exists()
    assert not list(run.glob("checkpoint_*")), "a diverged model was checkpointed"
    steps = [line for line in (run / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2, "the run was retried and trained again"  # steps 1-2 (step 3 stopped before logging)


# -- outputs touch only ours ------------------------------------------------------------------

def test_clean_output_holding_a_foreign_shard_or_manifest_is_refused(shard_copy, demo_raw, tmp_path):
    # Before: clean-data --out deleted a foreign shards/part-00099.parquet and overwrote a
    # foreign manifest.json without --overwrite.
    import json

    from dataset import RefinedDataset
    from pipelines.stage1_dask import OutputRefused, check_output

    source = json.loads((shard_copy / "manifest.json").read_text())["source"]["uri"]
    check_output(source, RefinedDataset.create(str(shard_copy)))  # our own run of this input: resumable
    foreign = shard_copy / "shards" / "part-00099.parquet"
    foreign.write_bytes(b"someone else's")
    with pytest.raises(OutputRefused, match="part-00099.parquet"):
        check_output(source, RefinedDataset.create(str(shard_copy)))
    assert foreign.read_bytes() == b"someone else's"
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"theirs": true}')
    with pytest.raises(OutputRefused, match="not a dataset of ours"):
        check_output(str(demo_raw / "vggface2"), RefinedDataset.create(str(other)))
    (other / "manifest.json").unlink()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputRefused, match="notes.txt"):
        check_output(str(demo_raw / "vggface2"), RefinedDataset.create(str(other)))


def test_overwrite_names_what_it_replaces(tmp_path, demo_raw, caplog):
    from dataset import RefinedDataset
    from pipelines.stage1_dask import check_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with caplog.at_level("WARNING"):
        check_output(str(demo_raw / "vggface2"), RefinedDataset.create(str(out)), overwrite=True)
    assert "--overwrite: replacing 1 files" in caplog.text and "notes.txt" in caplog.text


def test_output_reached_through_a_link_into_the_input_is_refused(tmp_path, demo_raw):
    # Before: --out link/out, link pointing into the input, wrote inside the input.
    from dataset import RefinedDataset
    from pipelines.stage1_dask import OutputRefused, check_output

    link = tmp_path / "link"
    os.symlink(demo_raw / "vggface2", link)
    with pytest.raises(OutputRefused, match="overlap.*links resolved"):
        check_output(str(demo_raw / "vggface2"), RefinedDataset.create(str(link / "out")))


def test_denoise_output_inside_its_data_or_model_is_refused(demo_shards, tmp_path):
    from dataset import RefinedDataset
    from pipelines.stage1_dask import OutputRefused
    from pipelines.stage2_ray import check_denoise_output

    data = RefinedDataset.open(str(demo_shards))
    model = tmp_path / "runs" / "model"
    model.mkdir(parents=True)
    with pytest.raises(OutputRefused, match="--data"):
        check_denoise_output(data, RefinedDataset.create(str(demo_shards / "denoised")), str(model))
    with pytest.raises(OutputRefused, match="--model"):
        check_denoise_output(data, RefinedDataset.create(str(model / "out")), str(model))
    os.symlink(model, tmp_path / "alias")
    with pytest.raises(OutputRefused, match="--model"):
        check_denoise_output(data, RefinedDataset.create(str(tmp_path / "alias")), str(model))
    check_denoise_output(data, RefinedDataset.create(str(tmp_path / "fresh")), str(model))  # elsewhere: taken


def test_export_never_writes_into_what_it_reads_nor_through_a_link(tmp_path):
    """`export --out MODEL/backbone.pt` once overwrote the checkpoint it read (rc 0, the model
    no longer loaded); `export` followed links. Both are refused, --overwrite or not."""
    import dataclasses

    import torch

    from pipelines.export import export_pth
    from pipelines.training.checkpoint import BACKBONE
    from pipelines.training.config import TrainConfig
    from pipelines.training.step import Trainee

    trainee = Trainee(TrainConfig(backbone="tiny", embedding_size=16, workers=1), 4, 0, 1, torch.device("cpu"))
    model = tmp_path / "model"
    model.mkdir()
    trainee.save(str(model), {"step": 0, "world": 1, "config": dataclasses.asdict(trainee.cfg)})
    before = (model / BACKBONE).read_bytes()
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="lies inside .*which this export reads"):
            export_pth(str(model), str(model / BACKBONE), overwrite=overwrite)
    assert (model / BACKBONE).read_bytes() == before
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "out.pth").symlink_to(victim)
    with pytest.raises(FileExistsError, match="is a link"):
        export_pth(str(model), str(tmp_path / "out.pth"), overwrite=True)
    assert victim.read_text() == "keep"
    export_pth(str(model), str(tmp_path / "fine.pth"))
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_pth(str(model), str(tmp_path / "fine.pth"))
