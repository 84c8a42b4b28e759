"""Evaluation-side readers fail closed (issue 31, part A): IJB meta files and 1:N CSVs are
validated before anything is computed, every image and tensor file read at evaluation time
goes through dataset/bounded.py (regular files inside their folder, byte cap, pixel cap from
the header, `.pth` zip sizes checked before torch.load). Each case asserts the refusal's
text; the cases that used to exhaust memory or hang run in a child process under a 2 GB
address-space limit and a timeout."""

import io
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from arcface_core.metrics import template_pair_scores
from cleaning.formats.insightface_bin import dumps_pairs
from cleaning.synthetic.hostile import png_bytes, pth_bomb
from cleaning.synthetic.ijb import write_ijb
from dataset import bounded
from pipelines import evaluate, ijb
from pipelines.training.step import read_backbone_file

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 2 << 30


def run_bounded(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Python `code` in a child process limited to 2 GB of address space, killed after
    `timeout` seconds (a hang fails the test instead of stalling the suite)."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({LIMIT_BYTES}, {LIMIT_BYTES}))\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    write_ijb(root, "IJBC", subjects=4, templates_per_subject=2, seed=5, size=96)
    return root


@pytest.fixture
def ijb_copy(release, tmp_path):
    """The release's meta files to edit (loose_crop/ shared: these tests never change it)."""
    root = tmp_path / "IJBC"
    shutil.copytree(release / "meta", root / "meta")
    (root / "loose_crop").symlink_to(release / "loose_crop")
    return root


def meta(root: Path, kind: str) -> Path:
    return root / "meta" / f"ijbc_{kind}"


def test_the_untouched_release_loads(release):
    s = ijb.load_ijb(str(release), "IJBC")
    assert len(s.images) == len(s.templates) == len(s.landmarks) == len(s.scores)
    assert set(np.unique(s.pairs)) <= set(s.templates.tolist()) and set(s.labels.tolist()) <= {0, 1}
    assert np.isfinite(s.landmarks).all() and s.galleries and s.probes


# -- IJB protocol files: refused before anything is computed, naming file, line and rule ----

def test_pairs_naming_templates_that_do_not_exist_are_refused(ijb_copy):
    pairs = meta(ijb_copy, "template_pair_label.txt")
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join(lines + ["-5 -7 1"] * 200) + "\n")
    with pytest.raises(ValueError, match=rf"template_pair_label.txt line {len(lines) + 1}: template -5 has no "
                                         r"images in .*face_tid_mid.txt; pairs must name templates that exist "
                                         r"\(200 such lines\)"):
        ijb.load_ijb(str(ijb_copy), "IJBC")


def test_a_removed_template_is_refused_not_scored_against_the_next(ijb_copy):
    faces = meta(ijb_copy, "face_tid_mid.txt")
    kept = [line for line in faces.read_text().splitlines() if line.split()[1] != "3"]
    faces.write_text("\n".join(kept) + "\n")
    with pytest.raises(ValueError, match=r"template_pair_label.txt line \d+: template 3 has no images"):
        ijb.load_ijb(str(ijb_copy), "IJBC")


def test_the_scoring_itself_never_falls_back_to_a_neighbouring_template():
    feats = np.eye(3)
    with pytest.raises(ValueError, match=r"pair 1 \[4, 2\] names a template without features"):
        template_pair_scores(np.array([2, 5, 9]), feats, np.array([[2, 9], [4, 2]]))
    with pytest.raises(ValueError, match="names a template without features"):
        template_pair_scores(np.array([2, 5, 9]), feats, np.array([[2, 10]]))  # past the last id


@pytest.mark.parametrize("label", ["2", "-1"])
def test_labels_other_than_0_and_1_are_refused(ijb_copy, label):
    pairs = meta(ijb_copy, "template_pair_label.txt")
    lines = pairs.read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:2] + [label])
    pairs.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"line 4: label {label}; labels are 1 \(same subject\) or 0"):
        ijb.load_ijb(str(ijb_copy), "IJBC")


@pytest.mark.parametrize("line, rule", [("1 2", "2 fields; a line is: template 1, template 2, label"),
                                        ("1 2 1 0", "4 fields"), ("1 x 1", "'x' is not an integer"),
                                        ("1 99999999999999999999 1",
                                         "'99999999999999999999' is not an integer \\(64-bit\\)")])
def test_malformed_pair_lines_are_refused(ijb_copy, line, rule):
    pairs = meta(ijb_copy, "template_pair_label.txt")
    pairs.write_text(pairs.read_text() + line + "\n")
    count = len(pairs.read_text().splitlines())
    with pytest.raises(ValueError, match=rf"line {count}: {rule}"):
        ijb.load_ijb(str(ijb_copy), "IJBC")


def test_an_empty_pair_file_is_refused(ijb_copy):
    meta(ijb_copy, "template_pair_label.txt").write_text("\n")
    with pytest.raises(ValueError, match="template_pair_label.txt: no pair lines"):
        ijb.load_ijb(str(ijb_copy), "IJBC")


def test_a_missing_landmark_coordinate_is_refused_not_shifted(ijb_copy):
    marks = meta(ijb_copy, "name_5pts_score.txt")
    lines = marks.read_text().splitlines()
    fields = lines[6].split()
    lines[6] = " ".join(fields[:4] + fields[5:])  # one coordinate gone: the score would become y5
    marks.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"name_5pts_score.txt line 7: 11 fields where the file's first line "
                                         r"has 12 \(a missing or extra value would shift the others\)"):
        ijb.load_ijb(str(ijb_copy), "IJBC")


@pytest.mark.parametrize("kind", ["face_tid_mid.txt", "name_5pts_score.txt"])
def test_duplicated_image_lines_are_refused(ijb_copy, kind):
    path = meta(ijb_copy, kind)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + lines[:50]) + "\n")
    name = lines[0].split()[0]
    with pytest.raises(ValueError, match=rf"{kind} line {len(lines) + 1}: image {name} is listed again "
                                         r"\(first on line 1\); each image once"):
        ijb.load_ijb(str(ijb_copy), "IJBC")


@pytest.mark.parametrize("column, value, rule", [(11, "nan", "detector score 'nan' is not a finite number"),
                                                 (11, "inf", "detector score 'inf' is not a finite number"),
                                                 (11, "-0.5", "detector score -0.5 is negative"),
                                                 (3, "NaN", "landmark coordinate 'NaN' is not a finite number"),
                                                 (1, "left", "landmark coordinate 'left' is not a number")])
def test_non_finite_numbers_are_refused(ijb_copy, column, value, rule):
    marks = meta(ijb_copy, "name_5pts_score.txt")
    lines = marks.read_text().splitlines()
    fields = lines[2].split()
    fields[column] = value
    lines[2] = " ".join(fields)
    marks.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"name_5pts_score.txt line 3: {rule}"):
        ijb.load_ijb(str(ijb_copy), "IJBC")


@pytest.mark.parametrize("name, rule", [("../../../../dev/zero", "a '..' component"),
                                        ("/etc/passwd", "an absolute path")])
def test_image_names_leaving_the_release_are_refused_on_load(ijb_copy, name, rule):
    for kind in ("face_tid_mid.txt", "name_5pts_score.txt"):
        path = meta(ijb_copy, kind)
        lines = path.read_text().splitlines()
        lines[0] = " ".join([name] + lines[0].split()[1:])
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"face_tid_mid.txt line 1: image name '{name}' is {rule}"):
        ijb.load_ijb(str(ijb_copy), "IJBC")


def test_one_to_n_files_name_existing_templates_with_one_subject(ijb_copy):
    gallery = meta(ijb_copy, "1N_gallery_G1.csv")
    original = gallery.read_text()
    gallery.write_text(original + "424242,S9999,\n")
    with pytest.raises(ValueError, match=r"1N_gallery_G1.csv line \d+: template 424242 has no images"):
        ijb.load_ijb(str(ijb_copy), "IJBC")
    first = original.splitlines()[1].split(",")
    gallery.write_text(original + f"{first[0]},S9999,\n")
    with pytest.raises(ValueError, match=rf"template {first[0]} has subject 'S9999' here and '{first[1]}' before"):
        ijb.load_ijb(str(ijb_copy), "IJBC")
    gallery.write_text(original.replace("TEMPLATE_ID", "TID", 1))
    with pytest.raises(ValueError, match=r"1N_gallery_G1.csv line 1: no TEMPLATE_ID column"):
        ijb.load_ijb(str(ijb_copy), "IJBC")


def test_non_finite_features_give_no_figures(release):
    s = ijb.load_ijb(str(release), "IJBC")
    feats = np.random.default_rng(0).normal(size=(len(s.images), 8))
    assert ijb.evaluate_ijb(s, feats)["pairs"] == len(s.pairs)
    feats[3, 1] = np.nan
    with pytest.raises(ValueError, match=rf"feature of image {s.images[3]} is not finite"):
        ijb.evaluate_ijb(s, feats)


# -- the bounded decoder: files, images and tensor files --------------------------------------

@pytest.fixture
def crops(tmp_path):
    """A loose_crop/ folder with one good image and the hostile entries beside it."""
    folder = tmp_path / "release" / "loose_crop"
    folder.mkdir(parents=True)
    import cv2

    cv2.imwrite(str(folder / "good.jpg"), np.full((80, 80, 3), 128, np.uint8))
    (tmp_path / "secret.jpg").write_bytes((folder / "good.jpg").read_bytes())
    os.symlink(tmp_path / "secret.jpg", folder / "outside.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    os.symlink("good.jpg", folder / "inside.jpg")  # a link that stays inside is fine
    os.mkfifo(folder / "fifo.jpg")
    with open(folder / "sparse.jpg", "wb") as fh:
        fh.truncate(bounded.MAX_IMAGE_BYTES + 1)
    (folder / "bomb.png").write_bytes(png_bytes(12000, 12000))
    (folder / "notes.hdr").write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 8 +X 8\n" + b"\0" * 256)
    return folder


def test_the_bounded_decoder_refuses_each_hostile_entry(crops):
    read = lambda name: bounded.read_inside(str(crops), name)  # noqa: E731
    assert bounded.decode_image(read("good.jpg"), "good.jpg").shape == (80, 80, 3)
    assert read("inside.jpg") == read("good.jpg")
    with pytest.raises(ValueError, match=r"outside.jpg: a link to .*secret.jpg, outside"):
        read("outside.jpg")
    with pytest.raises(ValueError, match=r"zero.jpg: a link to /dev/zero, outside"):
        read("zero.jpg")
    with pytest.raises(ValueError, match=r"fifo.jpg: not a regular file \(a folder, FIFO, socket or device\)"):
        read("fifo.jpg")  # refused on its kind: never opened, so no hang
    with pytest.raises(ValueError, match=rf"sparse.jpg: {bounded.MAX_IMAGE_BYTES + 1} bytes, over the "
                                         rf"{bounded.MAX_IMAGE_BYTES}-byte cap for a image"):
        read("sparse.jpg")
    with pytest.raises(ValueError, match=r"'\.\.' component"):
        read("../secret.jpg")
    with pytest.raises(ValueError, match="an absolute path"):
        read(str(crops / "good.jpg"))
    with pytest.raises(ValueError, match=r"bomb.png: 12000x12000 exceeds the 40000000-pixel cap"):
        bounded.decode_image(read("bomb.png"), "bomb.png")
    with pytest.raises(ValueError, match=r"notes.hdr: not a decodable image \(accepted formats"):
        bounded.decode_image(read("notes.hdr"), "notes.hdr")


def test_hostile_files_cost_bounded_memory_and_time(crops, tmp_path):
    """What used to read past 6 GB, hang, or decode to 5.4 GB: each refused in a child process
    limited to 2 GB of address space, the whole within the timeout."""
    landmarks = np.tile(np.array([[30, 30], [50, 30], [40, 40], [32, 52], [48, 52]], np.float32), (1, 1, 1))
    bin_path = tmp_path / "pairs.bin"
    bin_path.write_bytes(dumps_pairs([(crops / "good.jpg").read_bytes(), (crops / "bomb.png").read_bytes()], [True]))
    torch.save({"w": torch.ones(3)}, tmp_path / "honest.pth")
    (tmp_path / "bomb.pth").write_bytes(pth_bomb(1 << 30))
    os.symlink("/dev/zero", tmp_path / "zero.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    names = ["good.jpg", "zero.jpg", "fifo.jpg", "sparse.jpg", "bomb.png", "../../../../dev/zero"]
    done = run_bounded(f"""
        import numpy as np
        from pipelines import evaluate, ijb
        from pipelines.training.step import read_backbone_file
        names = {names!r}
        marks = np.repeat(np.array({landmarks.tolist()!r}, np.float32), len(names), 0)
        job = ijb.IJBImages({str(crops.parent)!r}, names, marks)
        load = job.open({{}})
        print("ok", load(0).shape)
        for i in range(1, len(names)):
            try:
                load(i)
                print("READ", names[i])
            except ValueError as exc:
                print("refused", exc)
        images = evaluate.BinImages({str(bin_path)!r}, 0, 2).open({{}})
        print("ok", images(0).shape)
        try:
            images(1)
        except ValueError as exc:
            print("refused", exc)
        print("ok", sorted(read_backbone_file({str(tmp_path / "honest.pth")!r})[0]))
        for name in ("bomb.pth", "zero.pth", "empty.pth"):
            try:
                read_backbone_file({str(tmp_path)!r} + "/" + name)
                print("LOADED", name)
            except ValueError as exc:
                print("refused", exc)
        """)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "ok (112, 112, 3)"
    assert "zero.jpg: a link to /dev/zero, outside" in lines[1]
    assert "fifo.jpg: not a regular file" in lines[2]
    assert "sparse.jpg: 67108865 bytes, over the 67108864-byte cap" in lines[3]
    assert "bomb.png: 12000x12000 exceeds the 40000000-pixel cap" in lines[4]
    assert "../../../../dev/zero: a '..' component" in lines[5]
    assert lines[6] == "ok (112, 112, 3)"
    assert f"{bin_path}: image 1: 12000x12000 exceeds the 40000000-pixel cap" in lines[7]
    assert lines[8] == "ok ['w']"
    assert f"bomb.pth: its 2 zip members declare {(1 << 30) + len(pickle.dumps({}))} bytes uncompressed in a " \
           "file of" in lines[9]
    assert "zero.pth: not a regular file" in lines[10]
    assert "empty.pth: 0 bytes, not a torch.save file" in lines[11]
    assert len(lines) == 12


def test_pair_sets_are_regular_files_within_the_cap(tmp_path):
    os.mkfifo(tmp_path / "lfw.bin")
    with pytest.raises(ValueError, match="lfw.bin: not a regular file"):
        evaluate.read_pair_labels(str(tmp_path / "lfw.bin"))
    with pytest.raises(ValueError, match="big.bin: 9 bytes, over the 8-byte cap for a evaluation set"):
        (tmp_path / "big.bin").write_bytes(b"123456789")
        bounded.read_bounded(str(tmp_path / "big.bin"), 8, "evaluation set")


def test_pth_files_torch_save_writes_load_and_others_are_refused_in_one_line(tmp_path):
    honest = tmp_path / "backbone.pth"
    torch.save({"module.fc.weight": torch.arange(6.0).reshape(2, 3)}, honest)
    state, digest = read_backbone_file(str(honest))
    assert list(state) == ["fc.weight"] and len(digest) == 64
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match=r"legacy.pth: not a torch.save zip archive"):
        read_backbone_file(str(tmp_path / "legacy.pth"))
    (tmp_path / "bomb.pth").write_bytes(pth_bomb(1 << 26))
    with pytest.raises(ValueError, match=r"bomb.pth: its 2 zip members declare \d+ bytes uncompressed in a file "
                                         r"of \d+ bytes"):
        read_backbone_file(str(tmp_path / "bomb.pth"))
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("archive/data.pkl", b"not a pickle")
    (tmp_path / "broken.pth").write_bytes(broken.getvalue())
    with pytest.raises(ValueError, match=r"broken.pth: not a loadable torch.save file of tensors"):
        read_backbone_file(str(tmp_path / "broken.pth"))


def test_the_cli_refuses_pairs_of_missing_templates_in_one_line(ijb_copy, tmp_path):
    pairs = meta(ijb_copy, "template_pair_label.txt")
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join(lines + ["-5 -7 1"] * 200) + "\n")
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "evaluate", "--model", str(tmp_path / "none"),
                           "--ijb", str(ijb_copy)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "template -5" in line]
    assert len(errors) == 1 and f"line {len(lines) + 1}: template -5 has no images" in errors[0]
    assert "Traceback" not in done.stderr
