"""The [clean] config section: stage 1 (`arcface stage1`, pipelines/stage1_dask.py; its tasks
read it in cleaning/stage1.py).

Its own module, free of the job's imports, so the config (and `arcface --help`) loads
without Dask, OpenCV or torch."""

from __future__ import annotations

from dataclasses import dataclass

from arcface_core.settings import WORKERS, setting


@dataclass
class CleanConfig:
    """Stage 1 (Dask): thresholds and execution. Defaults argued from measurements in
    benchmarks/results/stage1_thresholds.md (demo data and real photos)."""

    # Folder formats group whole identities.
    records_per_partition: int = setting(2000, range="[1, inf)", doc="records per Dask task; a task writes one shard")
    workers: int = setting(2, range=WORKERS, doc="Dask worker processes")
    memory_limit: str = setting("4GiB", doc="memory limit of each Dask worker (its nanny restarts a worker past it)")
    # When no partition has finished for this long, the ones in progress are taken as stuck
    # (a decoder looping on a crafted file, or a task Dask lost with a dead worker: CI hung
    # twice so): their workers are restarted and they are split as after a worker death, so
    # a record that hangs costs itself (resource/stalled), not the job. Generous: detection
    # alone took 130 ms per 512-px photo on one core (stage1_cpu.md), so a partition of 2,000
    # camera photos can take many minutes without being stuck. Below 5 s healthy partitions
    # would be restarted.
    stall_seconds: float = setting(1800.0, range="[5, inf)", doc=(
        "seconds without a finished partition after which the ones in progress count as stuck"))
    # A record on which a step raises is rejected (reason internal_error, the error in its
    # detail and log); but when more than this share of the records (and at least 10) are,
    # it is a bug, not bad input, and the job fails before writing its manifest.
    max_internal_error_share: float = setting(0.01, range="[0, 1]", doc=(
        "share of records rejected for an internal error (and at least 10) above which the job fails"))
    # 40 MP: a 7000x5700 photo still passes; a decompression bomb (e.g. 30000x30000) does not.
    max_pixels: int = setting(40_000_000, range="[1, inf)", doc="largest image accepted, in pixels")
    # MTCNN's own O-Net threshold is 0.7. On the demo every detection between 0.7 and 0.9 was
    # a real face (hard pose or light), and images without a face gave no detection at all;
    # on real photos low scores are profiles and occlusions. 0.8 drops the least sure.
    min_det_score: float = setting(0.8, range="[0, 1]", doc="least detector score a face is kept with")
    # The template puts the eyes 35.2 px apart: below 14 px the aligned crop is upsampled
    # 2.5x and more, and holds little identity information.
    min_eye_distance_px: float = setting(14.0, range="[0, inf)", doc=(
        "least distance between the eyes, in source pixels"))
    # Laplacian variance of the aligned central face. Demo (sharp faces vs faces blurred
    # with sigma 2.5-3.5 px; blurred median ~12-15): at 25, source landmarks (9,061 images):
    # blurred recall 0.91, precision 0.99; at 30: 0.96 but precision 0.89 (small sharp faces
    # upsampled by alignment score low). With MTCNN landmarks 25 and 30 both keep precision
    # 1.0 (recall of detected blurred faces 0.69 / 0.75). 25 keeps sharp faces safe.
    min_blur: float = setting(25.0, range="[0, inf)", doc=(
        "least sharpness (Laplacian variance of the aligned central face) a face is kept with"))
    # Hamming distance (of 256 dHash bits) under which two photos of an identity are one photo.
    # Demo: re-encoded/rescaled/shifted copies lie 9-60 bits apart; different photos of
    # the same identity (other pose, light, background) 93+ (5th percentile) around 127.
    near_duplicate_bits: int = setting(64, range="[0, 256]", doc=(
        "dHash distance (of 256 bits) under which two photos of an identity may be one photo"))
    # ... and whose 32x32 thumbnails correlate at least this much (demo: copies >= 0.87;
    # other photos that pass the hash screen <= 0.73).
    near_duplicate_correlation: float = setting(0.8, range="[-1, 1]", doc=(
        "least correlation of two such photos' 32x32 thumbnails for them to be one photo"))
    # Pre-aligned crops (insightface-rec) put every face at the template's spot, so the
    # landmark guard above says nothing there. Measured on demo data written as .rec
    # (benchmarks/results/aligned_near_duplicates.md, 2 seeds): re-encoded/shifted copies
    # lie <= 15 bits apart and correlate >= 0.9957; distinct photos of the same identity
    # >= 17 bits and <= 0.984. The correlation decides; the hash bound is only a cheap screen.
    near_duplicate_aligned_bits: int = setting(24, range="[0, 256]", doc="near_duplicate_bits for pre-aligned crops")
    near_duplicate_aligned_correlation: float = setting(0.99, range="[-1, 1]", doc=(
        "near_duplicate_correlation for pre-aligned crops"))
    # Landmarks may sit slightly outside the image (cropped chins); more is an annotation error.
    landmark_margin: float = setting(0.05, range="[0, 1]", doc=(
        "how far outside the image a landmark may sit, as a share of the image's longer side"))
    # MTCNN's P-Net looks at 12-pixel windows: a smaller minimum would upsample the whole image.
    detector_min_face: int = setting(20, range="[12, inf)", doc="smallest face the detector looks for, in pixels")
    detector_device: str = setting("auto", doc=(
        "torch device the detector runs on (cpu, cuda, cuda:1; auto: a GPU when there is one)"))
    detector_batch: int = setting(32, range="[1, inf)", doc="images per detector batch")
    # Detection runs on a copy whose longest side is at most this (as production detectors
    # do); boxes and landmarks are mapped back, and alignment samples the full-resolution
    # photo. Faces smaller than detector_min_face in that copy are not found.
    detect_max_side: int = setting(1280, range="[112, inf)", doc=(
        "longest side of the copy detection runs on, in pixels"))
    # Decoded pixels a worker holds at once: an identity is processed in chunks that stay
    # under it (8 camera photos of 4000x3000 are 96 MP = 288 MB as RGB), not whole.
    decoded_pixels_per_chunk: int = setting(100_000_000, range="[1, inf)", doc="decoded pixels a worker holds at once")
    # VGGFace2 ships landmarks.
    redetect: bool = setting(False, doc="detect faces even where the source gives landmarks")
    jpeg_quality: int = setting(95, range="[1, 100]", doc="JPEG quality of the aligned faces written")
    row_group_rows: int = setting(1000, range="[1, inf)", doc="rows per Parquet row group of the refined shards")
