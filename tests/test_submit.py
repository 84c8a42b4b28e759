"""`arcface submit`: what travels with a job, and what is refused before anything is submitted.
(The whole path against a cluster that shares nothing with this machine is
tests/test_infra.py::test_shared_nothing_rehearsal.)"""

import subprocess
import sys

import pytest

from pipelines.cli import COMMANDS_BY_NAME, _expand_alias
from pipelines.config import load_config
from pipelines.submit import (SubmitRefused, Target, check_config_paths, cluster_config, entrypoint, place_paths,
                              strip_config_options)

REMOTE = Target("http://10.0.0.1:8265", local_head=False)
LOCAL = Target("http://127.0.0.1:8265", local_head=True)


def test_a_local_path_is_refused_for_a_cluster_in_one_line():
    paths = COMMANDS_BY_NAME["train"].paths
    with pytest.raises(SubmitRefused, match=r"--data data/demo/refined/stage2: a path on this machine.*s3://"
                                            r".*--cluster-path"):
        place_paths(["--data", "data/demo/refined/stage2"], paths, REMOTE, cluster_path=False)
    with pytest.raises(SubmitRefused, match="--storage /tmp/runs"):
        place_paths(["--data", "s3://b/d", "--storage=/tmp/runs"], paths, REMOTE, cluster_path=False)
    # Every value of a many-valued path option is checked, not only the first.
    with pytest.raises(SubmitRefused, match="--pairs lfw.bin"):
        place_paths(["--model", "models:/arcface@champion", "--pairs", "s3://b/a.bin", "lfw.bin", "--no-flip"],
                    COMMANDS_BY_NAME["evaluate"].paths, REMOTE, cluster_path=False)


def test_remote_uris_and_asserted_cluster_paths_travel_as_typed():
    paths = COMMANDS_BY_NAME["train"].paths
    argv = ["--data", "s3://b/stage2", "--storage", "s3://b/runs", "--resume", "latest", "--workers", "2"]
    assert place_paths(argv, paths, REMOTE, cluster_path=False) == argv
    assert place_paths(["--data", "/mnt/fsx/stage2"], paths, REMOTE, cluster_path=True) == ["--data", "/mnt/fsx/stage2"]
    evaluate = ["--model", "models:/arcface@champion", "--pairs", "s3://b/lfw.bin", "s3://b/cfp.bin"]
    assert place_paths(evaluate, COMMANDS_BY_NAME["evaluate"].paths, REMOTE, cluster_path=False) == evaluate


def test_the_local_head_gets_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = place_paths(["--data", "d", "--name", "x"], COMMANDS_BY_NAME["train"].paths, LOCAL, cluster_path=False)
    assert out == ["--data", str(tmp_path / "d"), "--name", "x"]


def test_the_config_travels_by_content_without_this_machines_services(tmp_path):
    local = tmp_path / "recipe.toml"
    local.write_text("[train]\nlr = 0.05\nbatch_size = 96\n[services]\nstate_dir = \"/home/me/.arcface\"\n")
    cfg = load_config(str(local), ["train.name=from-set"], environ={})
    text = cluster_config(cfg)
    assert "[services]" not in text and "/home/me" not in text
    # What the job reads back is what this machine read, --set included.
    job = load_config(None, [], environ={"ARCFACE_CONFIG_TOML": text})
    assert (job.train.lr, job.train.batch_size, job.train.name) == (0.05, 96, "from-set")
    # --config and --set are not sent as options: they name a file the cluster cannot see.
    assert strip_config_options(["--data", "s3://b/d", "--config", str(local), "--set", "train.lr=1",
                                 "--set=train.seed=2", "--workers", "2"]) == ["--data", "s3://b/d", "--workers", "2"]


def test_the_derived_local_storage_is_refused_for_a_cluster(tmp_path):
    cfg = load_config(None, [], environ={"ARCFACE_STATE_DIR": str(tmp_path)})
    with pytest.raises(SubmitRefused, match=r"train.storage is .*--storage"):
        check_config_paths("train", cfg, REMOTE, cluster_path=False)
    check_config_paths("train", cfg, REMOTE, cluster_path=True)
    cfg.train.storage = "s3://b/runs"
    check_config_paths("train", cfg, REMOTE, cluster_path=False)


def test_the_job_runs_the_clusters_arcface_unless_code_is_uploaded():
    assert entrypoint("train", ["--data", "s3://b/d e"], "") == "arcface train --data 's3://b/d e'"
    assert entrypoint("evaluate", ["--model", "m"], "src").startswith("python -m pipelines.cli evaluate")
    assert sys.executable not in entrypoint("train", [], "")


def test_submit_train_is_an_alias_whose_own_options_may_come_anywhere():
    assert _expand_alias(["submit-train", "--data", "x", "--no-mlflow", "--working-dir", ".", "--workers", "2"]) == \
        ["submit", "--no-mlflow", "--working-dir", ".", "train", "--data", "x", "--workers", "2"]


def test_cli_refuses_a_local_path_for_a_remote_cluster_before_submitting(tmp_path):
    """A cluster address that answers nothing: the refusal comes first, in one line, exit 1
    (nothing is contacted for a command that cannot run there)."""
    import os

    env = dict(os.environ, RAY_ADDRESS="http://127.0.0.1:9", ARCFACE_STATE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "submit", "refine", "--input", str(tmp_path / "raw"),
                           "--format", "vggface2", "--out", "s3://b/refined"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "--input" in errors[0] and "--cluster-path" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


class _Job:
    """A job as the Jobs SDK reports it: its log stream, then its terminal status."""

    def __init__(self, lines, status, exit_code=None, interrupt=False):
        from ray.job_submission import JobStatus

        self.lines, self.interrupt = lines, interrupt
        self.info = type("Info", (), {"status": JobStatus(status), "message": "boom" if status != "SUCCEEDED" else "",
                                      "driver_exit_code": exit_code})()

    async def tail_job_logs(self, job_id):
        for line in self.lines:
            yield line
        if self.interrupt:
            raise KeyboardInterrupt

    def get_job_info(self, job_id):
        return self.info


def test_following_a_job_prints_its_logs_and_returns_its_exit_code(capsys):
    from pipelines.submit import follow

    assert follow(_Job(["step 1\n", "metrics: {}\n"], "SUCCEEDED"), "j1", "http://h:8265") == 0
    assert "metrics: {}" in capsys.readouterr().out
    assert follow(_Job([], "FAILED", exit_code=2), "j2", "http://h:8265") == 2
    assert "job j2 failed: boom" in capsys.readouterr().out
    assert follow(_Job([], "FAILED"), "j3", "http://h:8265") == 1


def test_ctrl_c_stops_following_not_the_job_and_says_how_to_stop_it(capsys):
    from pipelines.submit import follow

    assert follow(_Job(["step 1\n"], "RUNNING", interrupt=True), "j4", "http://h:8265") == 130
    err = capsys.readouterr().err
    assert "job j4 keeps running" in err and "ray job stop --address http://h:8265 j4" in err
