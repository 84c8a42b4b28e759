"""Stage 1 on normal data with hostile and large inputs mixed in: does it finish, is every
input accounted for, and what does a worker's memory peak at?

    python benchmarks/bench_hostile_job.py [--identities 40] [--memory-limit 1.5GiB]

Input (image-folder): a demo set of `--identities` identities, plus one identity of eight
4000x3000 camera photos, a 9000x9000 Radiance HDR bomb named .jpg (972 MB if decoded), a
30000x30000 PNG bomb, a 12000x12000 PNG (valid, under a raised pixel cap, over the worker's
memory: it must cost itself only), a GIF named .jpg, a dangling link, a link to a file
outside the input, a FIFO, a nested folder and a file at the root.
Writes benchmarks/results/hostile_job.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=40)
    ap.add_argument("--memory-limit", default="1.5GiB")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    import io

    import cv2
    import numpy as np
    from PIL import Image

    from cleaning.synthetic.demo import DemoConfig, generate, input_root
    from dataset import RefinedDataset
    from pipelines.stage1_dask import CleanConfig, run_stage1
    from test_hostile_inputs import big_png, camera_photo, png_bomb, radiance_hdr

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "demo", DemoConfig(identities=args.identities, images_per_identity=20, eval_identities=10,
                                          eval_pairs=60, ijb_subjects=0, workers=2), ["image-folder"])
        raw = input_root(tmp / "demo", "image-folder")  # one format: the layout is straight in demo/
        normal = sum(1 for _ in raw.rglob("*") if _.is_file())
        cam = raw / "zz_camera"
        cam.mkdir()
        for i in range(8):
            (cam / f"IMG_{i:04d}.jpg").write_bytes(camera_photo(shift=37 * i))
        bad = raw / "zz_hostile"
        bad.mkdir()
        (bad / "hdr_bomb.jpg").write_bytes(radiance_hdr(9000, 9000))
        (bad / "png_bomb.png").write_bytes(png_bomb(30000, 30000))
        (bad / "huge_valid.png").write_bytes(big_png(12000, 12000))
        buf = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buf, "GIF")
        (bad / "gif.jpg").write_bytes(buf.getvalue())
        (bad / "dangling.jpg").symlink_to(bad / "gone.jpg")
        (tmp / "secret.jpg").write_bytes(b"secret")
        (bad / "outside.jpg").symlink_to(tmp / "secret.jpg")
        os.mkfifo(bad / "fifo.jpg")
        (bad / "nested").mkdir()
        shutil.copy(next(raw.glob("*/*.jpg")), bad / "nested" / "deep.jpg")
        (raw / "loose.jpg").write_bytes(cv2.imencode(".jpg", np.zeros((50, 50, 3), np.uint8))[1].tobytes())
        hostile = 8 + 9  # the camera photos; the bombs, odd entries and the root file
        cfg = CleanConfig(workers=2, memory_limit=args.memory_limit, max_pixels=200_000_000)
        started = time.perf_counter()
        out = run_stage1(str(raw), "image-folder", RefinedDataset.create(tmp / "out"), cfg)
        seconds = time.perf_counter() - started
        m = out.manifest
        c = m.counts
        import pyarrow.parquet as pq

        rejects = pq.read_table(tmp / "out" / "rejects", columns=["key", "reason"]).to_pydict()
        hostile_rows = sorted((k, r) for k, r in zip(rejects["key"], rejects["reason"])
                              if k.startswith(("zz_", "loose")))
        kept_camera = sum(1 for k in pq.read_table(tmp / "out" / "shards", columns=["key"]).column("key").to_pylist()
                          if k.startswith("zz_camera/"))
    lines = ["# Stage 1 with hostile and large inputs among normal data", "",
             f"`python {' '.join(sys.argv)}` on {time.strftime('%Y-%m-%d %H:%M')}; 2 Dask workers, "
             f"memory limit {args.memory_limit} each, clean.max_pixels raised to 200 MP so that the 12000x12000 "
             "PNG reaches a decoder.", "",
             f"- finished in {seconds:.1f} s; read {c['read']} = kept {c['kept']} + rejected {c['rejected']} "
             f"(accounted: {c['read'] == c['kept'] + c['rejected']}); {normal} normal files + {hostile} hostile/large "
             f"entries",
             f"- peak resident memory of any worker: {m.extra['worker_peak_rss_mib']} MiB (limit {args.memory_limit})",
             f"- camera identity (8 photos of 4000x3000): {kept_camera} kept, the rest near duplicates of it", "",
             "| entry | reason |", "|---|---|"]
    lines += [f"| {k} | {r} |" for k, r in hostile_rows]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "hostile_job.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
