"""`arcface run`: the main job as a person watches it.

Four phases, each one `arcface` command run as a child process: demo data -> clean-data
(stage 1, bootstrap model, stage 2) -> training (`ray job submit`) -> promotion through the
registry's gate. The terminal gets one line per phase, a progress bar per long piece of work
and a closing summary; everything the phase prints (Dask, Ray, MLflow, our own INFO logs)
goes to `STATE/logs/<phase>.log`, whose path and last lines are shown when a phase fails.
`--log-level DEBUG` streams everything as well.

Children report progress and results as marked JSON lines (pipelines/logs.py); they travel
through Ray's log forwarding and `ray job logs`, so the training's progress reaches this
terminal from rank 0 of a job running on the cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cleaning.synthetic.demo import input_root
from dataset import storage
from pipelines.logs import EVENT, RESULT, Progress, _duration


@dataclass
class Phase:
    name: str
    title: str
    args: list[str]
    skip_reason: str = ""


@dataclass
class Outcome:
    seconds: float = 0.0
    code: int = 0
    results: list[dict] = field(default_factory=list)
    log: Path | None = None


def _child_env(log_level: str) -> dict:
    return dict(os.environ, ARCFACE_PROGRESS="events", ARCFACE_LOG_LEVEL=log_level, PYTHONUNBUFFERED="1")


def run_phase(phase: Phase, logs: Path, log_level: str, echo: bool) -> Outcome:
    """Runs one phase's command; its progress events become bars here, the rest its log."""
    logs.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(log=logs / f"{phase.name}.log")
    bars: dict[str, Progress] = {}
    started = time.monotonic()
    cmd = [sys.executable, "-m", "pipelines.cli", *phase.args]
    with open(outcome.log, "w") as log_file:
        log_file.write("$ arcface " + " ".join(phase.args) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=_child_env(log_level))
        try:
            _route(proc.stdout, log_file, bars, outcome, echo)
            outcome.code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted here: the phase must not go on unseen
                proc.kill()
                proc.wait()
    for bar in bars.values():
        bar.close()
    outcome.seconds = time.monotonic() - started
    return outcome


def _route(lines, log_file, bars: dict[str, Progress], outcome: Outcome, echo: bool) -> None:
    """Progress events to bars, results to the outcome, everything else to the phase's log."""
    finished: set[str] = set()  # a repeated last event (Ray's log forwarding) opens no new bar
    for line in lines:
        try:
            if EVENT in line:
                event = json.loads(line.split(EVENT, 1)[1])
                if event["desc"] not in finished:
                    _show(bars, event)
                    if event.get("done"):
                        finished.add(event["desc"])
                continue
            if RESULT in line:
                outcome.results.append(json.loads(line.split(RESULT, 1)[1]))
                continue
        except (ValueError, KeyError):  # a marker line mangled on the way (interleaved output): log text
            pass
        log_file.write(line)
        if echo:
            sys.stderr.write(line)


def _show(bars: dict[str, Progress], event: dict) -> None:
    bar = bars.get(event["desc"])
    if bar is None:
        bar = bars[event["desc"]] = Progress(event["desc"], event.get("total"), event.get("unit", "it"))
    bar.update(max(0, event["n"] - bar.n), **event.get("figures", {}))
    if event.get("done"):
        bar.close()
        del bars[event["desc"]]


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join("    " + line for line in text[-lines:])


def main_job(args, cfg) -> int:
    from infra.local_services import LocalServices

    raw, refined, config = args.input, args.out, args.config
    common = ["--config", config] + [x for item in args.overrides for x in ("--set", item)]
    demo = args.input == args.demo_raw
    phases = [
        Phase("demo-data", "demo data", ["demo-data", "--out", raw, "--format", args.format, *common],
              skip_reason="already there" if not demo or Path(raw, "ground_truth.json").exists() else ""),
        Phase("clean-data", "clean data: stage 1 (Dask) -> bootstrap model (Ray Train) -> stage 2 (Ray)",
              ["clean-data", "--input", str(input_root(raw, args.format)) if demo else raw, "--format", args.format,
               "--out", refined, *common]),
        Phase("train", "train on the refined data (ray job submit)",
              ["submit", "train", "--data", storage.join(refined, "stage2"), *common]),
        Phase("promote", "evaluate and promote (registry gate)",
              ["promote", *(["--name", args.model] if args.model else []), "--version", "latest", *common]),
    ]
    services = LocalServices(cfg.services)
    logs = services.logs
    echo = (args.log_level or os.environ.get("ARCFACE_LOG_LEVEL", "")).upper() == "DEBUG"
    outcomes: dict[str, Outcome] = {}
    total_start = time.monotonic()
    for n, phase in enumerate(phases, start=1):
        head = f"[{n}/{len(phases)}] {phase.title}"
        if phase.skip_reason:
            print(f"{head}: skipped ({phase.skip_reason})", flush=True)
            continue
        print(head, flush=True)
        outcome = outcomes[phase.name] = run_phase(phase, logs, "DEBUG" if echo else "INFO", echo)
        if outcome.code and not (phase.name == "promote" and outcome.code == 1 and outcome.results):
            print(f"      failed after {_duration(outcome.seconds)} (exit {outcome.code}); log: {outcome.log}\n"
                  f"{_tail(outcome.log)}", flush=True)
            return outcome.code
        print(f"      {_describe(phase.name, outcome)} ({_duration(outcome.seconds)})", flush=True)
    print(_summary(outcomes, services, cfg, time.monotonic() - total_start), flush=True)
    return 0


def _result(outcome: Outcome | None, kind: str) -> dict:
    for r in (outcome.results if outcome else []):
        if r.get("kind") == kind:
            return r
    return {}


def _describe(phase: str, outcome: Outcome) -> str:
    if phase == "demo-data":
        r = _result(outcome, "demo-data")
        return f"{r.get('records', '?')} raw records in {r.get('path', '?')}"
    if phase == "clean-data":
        r = _result(outcome, "clean-data")
        return (f"kept {r.get('kept')} of {r.get('read')} faces, {r.get('identities')} identities -> "
                f"{r.get('dataset')}")
    if phase == "train":
        r = _result(outcome, "train")
        accuracy = {k: v for k, v in r.get("metrics", {}).items() if k.endswith(".accuracy")}
        shown = ", ".join(f"{k.split('-')[0]} accuracy {v:.3f}" for k, v in accuracy.items())
        return f"checkpoint {r.get('checkpoint', '?')}" + (f"; {shown}" if shown else "")
    if phase == "promote":
        r = _result(outcome, "promote")
        return ("promoted: " if r.get("promoted") else "not promoted: ") + str(r.get("message", ""))
    return "done"


def _summary(outcomes: dict[str, Outcome], services, cfg, seconds: float) -> str:
    cleaned, promote = _result(outcomes.get("clean-data"), "clean-data"), _result(outcomes.get("promote"), "promote")
    lines = ["", f"Done in {_duration(seconds)}."]
    if cleaned:
        lines += [f"  refined dataset  {cleaned['dataset']}: {cleaned['kept']} faces kept, {cleaned['rejected']} "
                  f"rejected of {cleaned['read']}; {cleaned['identities']} identities",
                  f"  report           {cleaned['report']}"]
    if promote:
        lines += [f"  model            {promote.get('name')} v{promote.get('version')}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in promote.get("figures", {}).items()),
                  f"  champion         {promote.get('name')} v{promote.get('champion')}"]
    lines += [f"  MLflow           {cfg.services.mlflow_tracking_uri or services.mlflow_uri}",
              f"  Ray dashboard    {cfg.services.ray_address or services.ray_dashboard}",
              f"  logs             {services.logs}/"]
    return "\n".join(lines)
