"""`arcface run` (what `make run` calls) as a person sees it: a short output with one line per
phase, progress, a summary and a champion; the full output in per-phase log files."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipelines.cli"]
pytestmark = pytest.mark.services


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_main_job_is_short_shows_progress_and_ends_with_a_champion(tmp_path):
    config = tmp_path / "ports.toml"
    config.write_text(f"[services]\nray_port = {free_port()}\nray_dashboard_port = {free_port()}\n"
                      f"mlflow_port = {free_port()}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "ARCFACE_"))}
    env.update(ARCFACE_STATE_DIR=str(tmp_path / "state"), ARCFACE_CONFIG=str(config))
    raw, out = tmp_path / "raw", tmp_path / "refined"
    tiny = ["--set", "demo.identities=30", "--set", "demo.images_per_identity=12", "--set", "demo.eval_identities=8",
            "--set", "demo.eval_pairs=80", "--set", "denoise.bootstrap_epochs=3", "--set", "train.epochs=3"]
    try:
        proc = subprocess.run(CLI + ["run", "--input", str(raw), "--demo-raw", str(raw), "--out", str(out), *tiny],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, text[-4000:]
        lines = text.splitlines()
        assert len(lines) <= 60, "\n".join(lines)
        for n, phase in enumerate(("demo data", "clean data", "train on the refined data", "evaluate and promote"), 1):
            assert any(line.startswith(f"[{n}/4] {phase}") for line in lines), text
        # Progress of the long work, the training's from rank 0 of a `ray job submit` job.
        assert any(line.startswith("stage 1:") for line in lines)
        assert any(line.startswith("train bootstrap: ") and "loss" in line for line in lines)
        assert any(line.startswith("embedding: ") for line in lines)
        assert any(line.startswith("train arcface: ") and "/" in line and "eta" in line for line in lines), text
        assert "promoted: arcface v1 is the first champion" in text
        summary = text[text.index("Done in"):]
        for key in ("refined dataset", "report", "model            arcface v1", "champion         arcface v1",
                    "MLflow", "Ray dashboard", "logs"):
            assert key in summary, summary
        # What was kept off the terminal is in the phase logs.
        logs = tmp_path / "state" / "logs"
        assert {"demo-data.log", "clean-data.log", "train.log", "promote.log"} <= {p.name for p in logs.iterdir()}
        # Ray's start-up banner and its workers' lines (Dask says nothing at INFO on a clean run).
        refine_log = (logs / "clean-data.log").read_text()
        assert "Started a local Ray instance" in refine_log and "Started a local Ray instance" not in text
        assert "RayTrainWorker" in refine_log and "RayTrainWorker" not in text
        assert "PlacementGroupCleaner" not in text + (logs / "clean-data.log").read_text() + (logs / "train.log").read_text()
        # `make evaluate` works right after: the champion alias exists.
        evaluated = subprocess.run(CLI + ["evaluate", "--model", "models:/arcface@champion", "--data",
                                          str(out / "stage2")], env=env, cwd=ROOT, capture_output=True, text=True,
                                   timeout=300)
        assert evaluated.returncode == 0 and '"accuracy"' in evaluated.stdout, evaluated.stderr[-2000:]
    finally:
        subprocess.run(CLI + ["services", "down"], env=env, cwd=ROOT, capture_output=True, timeout=120)
