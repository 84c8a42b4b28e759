"""`arcface`: the one command-line interface. Make targets are thin calls of it.

Every command takes `--config FILE` (TOML) and `--set section.key=value` overrides; with
neither it runs on the embedded default (local services, local files, demo data).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from pipelines.config import ConfigError, load_config, to_toml
from pipelines.logs import progress, report_result, setup_logging

log = logging.getLogger("arcface")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (sections as in `arcface config show`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO or $ARCFACE_LOG_LEVEL)")


def cmd_run(args, cfg) -> int:
    from pipelines.main_job import main_job

    args.format = args.input_format
    return main_job(args, cfg)


def cmd_config_show(args, cfg) -> int:
    print(to_toml(cfg, origins=args.origins))
    return 0


def cmd_services(args, cfg) -> int:
    from infra.local_services import LocalServices, ServiceError

    services = LocalServices(cfg.services)
    try:
        if args.action == "up":
            wanted = tuple(args.only.split(",")) if args.only else ("ray", "mlflow") + (("s3",) if args.s3 else ())
            services.up(wanted)
        elif args.action == "down":
            services.down()
            print("all local services stopped")
            return 0
        elif args.action == "env":
            if args.s3:
                print("# the local S3 endpoint (moto) and its test credentials: local-only, they open nothing else")
            for key, value in services.env(with_s3=args.s3).items():
                print(f"export {key}={value}")
            return 0
    except ServiceError as exc:
        log.error("%s", exc)
        return 1
    rows = services.status()
    for s in rows:
        print(f"{s.name:7s} {'up' if s.up else 'down':5s} {s.address:28s} {s.detail}")
    if args.action == "up":
        print(f"\nstate and logs: {services.root}")
        print("use them with:  eval \"$(arcface services env)\"")
    return 0


def cmd_demo_data(args, cfg) -> int:
    from cleaning.synthetic.demo import FORMATS, generate

    demo = cfg.demo
    for key in ("identities", "images_per_identity", "seed", "workers"):
        value = getattr(args, key)
        if value is not None:
            setattr(demo, key, value)
    formats = list(FORMATS) if "all" in args.format else args.format
    start = time.perf_counter()
    summary = generate(args.out, demo, formats, progress=progress)
    elapsed = time.perf_counter() - start
    for fmt, info in summary.items():
        print(f"{fmt:13s} {info['records']:6d} records  {info['path']}")
        print(f"              defects: {info['defects']}  malformed rows: {info['malformed_rows']}")
    print(f"done in {elapsed:.1f} s")
    report_result(kind="demo-data", records=sum(i["records"] for i in summary.values()),
                  path=", ".join(i["path"] for i in summary.values()))
    return 0


def cmd_fetch_weights(args, cfg) -> int:
    from cleaning.detect.weights import fetch_mtcnn_weights

    print(f"MTCNN weights in {fetch_mtcnn_weights()}")
    return 0


def cmd_clean_data(args, cfg) -> int:
    from dataset import RefinedDataset
    from pipelines.clean_data import run_clean_data

    out = run_clean_data(args.input, args.format, RefinedDataset.create(args.out), cfg.clean, scheduler=args.scheduler,
                         overwrite=args.overwrite)
    _print_counts(out.manifest)
    print(f"shards, rejects and manifest in {out.uri} ({out.manifest.extra.get('seconds')} s)")
    return _report_status(out)


def _report_status(*datasets) -> int:
    """0 when every dataset's report was written; else one error line each, and 1."""
    from dataset import storage

    missing = [d for d in datasets if not storage.exists(d.report_index)]
    for d in missing:
        print(f"error: the report of {d.uri} could not be written (the traceback is in the log above); "
              "the dataset itself is complete", file=sys.stderr)
    if not missing:
        print("report: " + ", ".join(d.report_index for d in datasets))
    return 1 if missing else 0


def _train_overrides(args, cfg) -> None:
    t = cfg.train
    if args.workers is not None:
        t.workers = args.workers
    if args.gpu:
        t.gpu = True
    if args.storage:
        t.storage = args.storage
    if args.name:
        t.name = args.name
    if args.max_steps is not None:
        t.max_steps = args.max_steps
    if args.init_backbone:
        t.init_backbone = args.init_backbone


def cmd_train(args, cfg) -> int:
    from infra.local_services import check_ray, tracking_uri
    from pipelines.training.driver import run_training

    _train_overrides(args, cfg)
    check_ray(cfg.services.ray_address)
    # Tracked when a server is configured (submit-train configures the local one); it must answer.
    mlflow_uri = tracking_uri(cfg.services) if cfg.services.mlflow_tracking_uri else ""
    result = run_training(args.data, cfg.train, cfg.margin, resume=args.resume, mlflow_uri=mlflow_uri,
                          ray_address=cfg.services.ray_address)
    if result.error:
        log.error("training failed: %s", result.error)
        return 1
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else '-'}")
    print(f"metrics: {json.dumps(result.metrics)}")
    report_result(kind="train", checkpoint=result.checkpoint.path if result.checkpoint else "", metrics=result.metrics)
    if mlflow_uri:
        print(f"MLflow: {mlflow_uri} (experiment {cfg.train.mlflow_experiment})")
    return 0


def _secret(name: str) -> bool:  # by shape, not by a list that a new variable slips past
    return any(word in name for word in ("SECRET", "TOKEN", "PASSWORD", "KEY_ID", "AUTH", "CREDENTIAL"))


def job_environment(environ) -> dict:
    """What of this shell's environment travels with a submitted job. Settings do; secrets
    do not (a job's runtime env is shown in the Ray dashboard; credentials come from the
    cluster: instance role, IRSA, the nodes' env). The one exception is the local S3
    endpoint's fixed fake keys ("testing"), which are no secret; real keys are never sent,
    not even to a local endpoint."""
    from infra.local_services import LOCAL_S3_ENV

    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or ""
    local_s3 = endpoint.startswith(("http://127.0.0.1", "http://localhost"))
    sent = {k: v for k, v in environ.items()
            if (k.startswith(("MLFLOW_", "AWS_")) or k in ("ARCFACE_LOG_LEVEL", "ARCFACE_PROGRESS"))
            and (not _secret(k) or (local_s3 and LOCAL_S3_ENV.get(k) == v))}
    base = environ.get("ARCFACE_CONFIG", "")
    if base:  # the base config this command read its settings with: the job must read the same
        sent["ARCFACE_CONFIG"] = base if "://" in base else os.path.abspath(base)
    return sent


def cmd_submit_train(args, cfg) -> int:
    """Ensure a Ray head, then `ray job submit` the training with this project as working dir."""
    import shlex
    import subprocess
    from pathlib import Path

    import copy

    from dataset import RefinedDataset
    from infra.local_services import LocalServices, check_ray, ray_client_env, tracking_uri, without_credentials
    from pipelines.training.driver import check_input

    # What would fail in the job on every attempt fails here, before anything is submitted.
    planned = copy.deepcopy(cfg)
    _train_overrides(args, planned)
    check_input(RefinedDataset.open(args.data), planned.train, planned.margin)
    services = LocalServices(cfg.services)
    address = cfg.services.ray_address
    check_ray(address)
    if not address:
        services.up(("ray",))
        address = services.ray_dashboard
    if not address.startswith("http"):
        # A GCS address (host:6379 or ray://host:10001): jobs go to that host's dashboard.
        host = address.split("://")[-1].split(":")[0]
        address = f"http://{host}:{cfg.services.ray_dashboard_port}"
    env_vars = job_environment(os.environ)
    if any(_secret(k) and k not in env_vars for k in os.environ if k.startswith(("MLFLOW_", "AWS_"))):
        log.info("credentials in this shell are not sent with the job; the cluster's nodes need their own")
    from pipelines.training.driver import code_version

    env_vars["ARCFACE_CODE_VERSION"] = code_version()
    if cfg.services.mlflow_tracking_uri or not args.no_mlflow:
        # The configured server (which must answer), else the local one, started if needed;
        # user:password in the URI stays here (the dashboard shows a job's environment).
        uri = tracking_uri(cfg.services)
        if without_credentials(uri) != uri:
            log.info("the tracking URI's credentials are not sent with the job (MLFLOW_TRACKING_USERNAME/PASSWORD "
                     "on the cluster's nodes)")
        env_vars["MLFLOW_TRACKING_URI"] = without_credentials(uri)
    entry = [sys.executable, "-m", "pipelines.cli", "train", "--data", os.path.abspath(args.data)
             if not args.data.startswith("s3://") else args.data]
    if args.config:
        entry += ["--config", os.path.abspath(args.config)]
    for item in args.overrides:
        entry += ["--set", item]
    # The job runs in a copy of the project (Ray's working_dir): a relative storage path
    # would land in Ray's temp folder, so resolve it here, where the user means it.
    storage = args.storage or cfg.train.storage
    if not storage.startswith("s3://"):
        args.storage = os.path.abspath(storage)
    if args.init_backbone and not args.init_backbone.startswith("s3://"):
        args.init_backbone = os.path.abspath(args.init_backbone)
    if args.resume and not args.resume.startswith("s3://"):
        args.resume = os.path.abspath(args.resume)
    for flag in ("workers", "storage", "name", "max_steps", "init_backbone"):
        value = getattr(args, flag)
        if value is not None:
            entry += [f"--{flag.replace('_', '-')}", str(value)]
    if args.gpu:
        entry.append("--gpu")
    if args.resume:
        entry += ["--resume", args.resume]
    ray = str(Path(sys.executable).parent / "ray")
    job_id = f"arcface-{planned.train.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [ray, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
           "--working-dir", str(Path(__file__).resolve().parents[1]),
           "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *entry]
    log.info("submitting %s: %s", job_id, " ".join(shlex.quote(c) for c in cmd[:6]) + " ...")
    # A head that has just started answers before its job agent does ("No available agent"):
    # that one answer is worth waiting for; any other refusal is final.
    deadline = time.monotonic() + 120
    while True:
        submitted = subprocess.run(cmd, env=ray_client_env(), capture_output=True, text=True)
        said = submitted.stdout + submitted.stderr
        if submitted.returncode == 0:
            break
        if "No available agent" not in said or time.monotonic() > deadline:
            log.error("ray job submit failed: %s", said.strip().splitlines()[-1] if said.strip() else "no output")
            return 1
        time.sleep(3)
    # Follow the job's logs here until it ends (Ctrl-C leaves it running: `ray job stop ID`).
    subprocess.call([ray, "job", "logs", "--address", address, "--follow", job_id], env=ray_client_env())
    status = subprocess.run([ray, "job", "status", "--address", address, job_id], env=ray_client_env(),
                            capture_output=True, text=True)
    # Ray prints "Job '<id>' succeeded" (a failed job's status carries its log tail, so no looser match)
    succeeded = f"Job '{job_id}' succeeded" in status.stdout + status.stderr
    print(f"job {job_id} {'succeeded' if succeeded else 'failed'}")
    return 0 if succeeded else 1


def _print_counts(manifest) -> None:
    c = manifest.counts
    print(f"read {c['read']}  kept {c['kept']}  rejected {c['rejected']}  identities {manifest.num_classes}")
    for stage, v in c.get("by_stage", {}).items():
        print(f"  {stage:10s} read {v['read']}  kept {v['kept']}  rejected {v['rejected']}")
    for reason, n in c["by_reason"].items():
        print(f"  {reason:40s} {n}")


def cmd_denoise(args, cfg) -> int:
    from dataset import RefinedDataset
    from pipelines.denoise import run_denoise

    mlflow_uri = _use_tracking_server(cfg) if args.model.startswith(("models:/", "runs:/")) \
        else cfg.services.mlflow_tracking_uri
    from pipelines.registry import require_trusted

    require_trusted(args.model, args.trust_model_code)
    out = run_denoise(RefinedDataset.open(args.data), RefinedDataset.create(args.out), args.model, cfg.denoise,
                      ray_address=cfg.services.ray_address, mlflow_uri=mlflow_uri)
    _print_counts(out.manifest)
    print(f"shards, rejects and manifest in {out.uri}")
    return _report_status(out)


def cmd_refine(args, cfg) -> int:
    from pipelines.denoise import run_refine

    if args.retrain:
        cfg.denoise.retrain = True
    result = run_refine(args.input, args.format, args.out, cfg, scheduler=args.scheduler, overwrite=args.overwrite)
    _print_counts(result.stage2.manifest)
    print(f"bootstrap model: {result.bootstrap_checkpoint}")
    print(f"refined dataset: {result.stage2.uri} (report: {result.stage2.report_index})")
    c = result.stage2.manifest.counts
    report_result(kind="refine", read=c["read"], kept=c["kept"], rejected=c["rejected"],
                  identities=result.stage2.num_classes, dataset=result.stage2.uri, report=result.stage2.report_index,
                  bootstrap=result.bootstrap_checkpoint)
    if result.refined_checkpoint:
        print(f"model trained on it: {result.refined_checkpoint}")
    return _report_status(result.stage1, result.stage2)


def cmd_holdout(args, cfg) -> int:
    from cleaning.holdout import split_holdout
    from dataset import RefinedDataset

    out = split_holdout(RefinedDataset.open(args.data), RefinedDataset.create(args.out), args.identities,
                        pairs=args.pairs, seed=args.seed)
    h = out.manifest.extra["holdout"]
    print(f"held out {len(h['identities'])} identities; training set: {out.manifest.num_classes} identities, "
          f"{out.manifest.num_images} images in {out.uri}")
    print(f"evaluation sets: {h['pairs_file']} ({h['pairs']} pairs), {h['faces_file']}")
    return 0


def cmd_evaluate(args, cfg) -> int:
    from dataset import RefinedDataset
    from dataset.refined import split_eval_sets
    from pipelines.evaluate import dumps, evaluate, roc_png
    from pipelines.registry import load_embedder, require_trusted

    pairs, faces = split_eval_sets(args.pairs)
    if args.data:
        more_pairs, more_faces = RefinedDataset.open(args.data).eval_sets()
        pairs, faces = pairs + more_pairs, faces + more_faces
    if not pairs and not faces and not args.ijb:
        log.error("nothing to evaluate on: give --pairs FILE (.bin or *_faces.parquet), --data DATASET or --ijb DIR")
        return 2
    tracked = args.model.startswith(("models:/", "runs:/"))
    if tracked:
        _use_tracking_server(cfg)
    require_trusted(args.model, args.trust_model_code)
    loaded = load_embedder(args.model)
    results = evaluate(loaded.embedder, pairs, faces, flip=not args.no_flip)
    if args.ijb:
        from pipelines import ijb

        ijb_set = ijb.load_ijb(args.ijb, args.target)
        name = f"{ijb_set.target}-{ijb_set.digest}"
        results[name] = ijb.evaluate_ijb(ijb_set, ijb.embed_images(ijb_set, loaded.embedder), norm=args.ijb_norm,
                                         detector_score=args.ijb_detector_score)
        print(ijb.table(name, results[name]))
        if tracked and args.model.startswith("models:/"):
            from pipelines.registry import record_evaluation

            print(f"recorded on {record_evaluation(args.model, {name: results[name]})}")
    text = dumps(results)
    print(text)
    if args.out:
        from dataset import storage

        storage.write_bytes(storage.join(args.out, "evaluation.json"), (text + "\n").encode())
        png = roc_png(results, title=args.model)
        if png:
            storage.write_bytes(storage.join(args.out, "roc.png"), png)
        print(f"written to {args.out}")
    return 0


def cmd_export(args, cfg) -> int:
    from pipelines import export

    if args.export_format == "onnx":
        if not args.model:
            raise ValueError("--format onnx exports a model: give --model")
        if args.model.startswith(("models:/", "runs:/")):
            _use_tracking_server(cfg)
        from pipelines.registry import require_trusted

        require_trusted(args.model, args.trust_model_code)
        result = export.export_onnx(args.model, args.out, flip=not args.no_flip)
        print(f"ONNX (opset {result.opset}, dynamic batch, uint8 (N,112,112,3) in, L2-normalised out"
              f"{', flip test inside' if result.flip else ''}): {result.path}")
        print(f"onnxruntime vs PyTorch on {result.faces_checked} faces: max abs difference {result.max_abs_diff:.2e}")
        logged = export.log_onnx_to_registry(args.model, result)
        if logged:
            print(f"logged as an artifact of {logged} (onnx/)")
        return 0
    if not args.data:
        raise ValueError("--format rec exports a dataset: give --data")
    from dataset import RefinedDataset

    data = RefinedDataset.open(args.data)
    count = export.export_rec(data, args.out)
    print(f"{count} faces of {data.num_classes} identities in {args.out} (train.rec, train.idx, property)")
    return 0


def _use_tracking_server(cfg) -> str:
    """Point MLflow at the configured tracking server (services.mlflow_tracking_uri, which
    MLFLOW_TRACKING_URI sets; it must answer within seconds), else at the local server of
    `arcface services up`, started if it is not running."""
    import mlflow

    from infra.local_services import tracking_uri

    uri = tracking_uri(cfg.services)
    mlflow.set_tracking_uri(uri)
    return uri


def _registry_name(args, cfg) -> str:
    name = args.name or cfg.train.registered_model
    if not name:
        raise SystemExit("no model name: give --name or set train.registered_model")
    return name


def cmd_promote(args, cfg) -> int:
    from pipelines.registry import PromotionRefused, promote

    from dataset.refined import split_eval_sets

    pairs, faces = split_eval_sets(args.pairs)
    name = _registry_name(args, cfg)
    _use_tracking_server(cfg)
    try:
        decision = promote(name, args.version, metric=args.metric, min_delta=args.min_delta,
                           pair_uris=pairs, face_uris=faces)
    except PromotionRefused as exc:
        log.error("refused: %s", exc)
        return 1
    print(("promoted: " if decision.promoted else "refused: ") + decision.message)
    shown = {k.split("-")[0] + "." + k.rsplit(".", 1)[1]: v for k, v in (decision.figures or {}).items()
             if k.endswith((".accuracy", ".rank1"))}
    report_result(kind="promote", name=name, version=decision.version, promoted=decision.promoted,
                  message=decision.message, champion=decision.champion_version, figures=shown)
    return 0 if decision.promoted else 1


def cmd_rollback(args, cfg) -> int:
    from pipelines.registry import PromotionRefused, rollback

    _use_tracking_server(cfg)
    try:
        print(rollback(_registry_name(args, cfg)).message)
    except PromotionRefused as exc:
        log.error("%s", exc)
        return 1
    return 0


def cmd_lineage(args, cfg) -> int:
    from pipelines.registry import lineage

    _use_tracking_server(cfg)
    print(json.dumps(lineage(_registry_name(args, cfg), args.version), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arcface", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the main job: demo data -> refine -> train -> promote, with progress and a summary")
    p.add_argument("--input", default="data/demo/raw", help="raw dataset (default: the demo, generated if missing)")
    p.add_argument("--format", dest="input_format", default="vggface2",
                   choices=["vggface2", "msceleb-tsv", "image-folder", "insightface-rec"])
    p.add_argument("--out", default="data/demo/refined", help="folder for stage1/, runs/, stage2/")
    p.add_argument("--model", default=None, help="registered model to promote (default: train.registered_model)")
    p.add_argument("--demo-raw", default="data/demo/raw", help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=cmd_run, config="configs/demo-train.toml")

    p = sub.add_parser("config", help="show the effective config")
    p.add_argument("action", choices=["show"])
    p.add_argument("--origins", action="store_true",
                   help="say after each value where it came from: default, file, environment or --set")
    _common(p)
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("services", help="start, stop or inspect the local Ray head, MLflow server and S3 endpoint")
    p.add_argument("action", choices=["up", "down", "status", "env"],
                   help="up: start (idempotent); down: stop all; status: who answers; env: shell exports")
    p.add_argument("--s3", action="store_true", help="also start (or export) the local S3 endpoint (moto)")
    p.add_argument("--only", metavar="LIST", help="comma-separated subset of ray,mlflow,s3")
    _common(p)
    p.set_defaults(func=cmd_services)

    p = sub.add_parser("demo-data", help="write the synthetic raw demo dataset with known defects")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", action="append",
                   choices=["vggface2", "msceleb-tsv", "image-folder", "insightface-rec", "all"],
                   default=None, help="raw layout; repeatable; 'all' writes each into a subfolder (default vggface2)")
    p.add_argument("--identities", type=int, help="number of training identities (config demo.identities)")
    p.add_argument("--images-per-identity", type=int, help="images per identity (config demo.images_per_identity)")
    p.add_argument("--seed", type=int, help="random seed; same seed, same bytes")
    p.add_argument("--workers", type=int, help="render processes (config demo.workers)")
    _common(p)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("fetch-weights", help="fetch the MTCNN weights into the cache (make setup does this)")
    _common(p)
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("clean-data", help="stage 1 on Dask: raw dataset -> aligned, filtered Parquet shards")
    p.add_argument("--input", required=True, help="raw dataset folder or s3:// URI")
    p.add_argument("--format", required=True, choices=["vggface2", "msceleb-tsv", "image-folder", "insightface-rec"])
    p.add_argument("--out", required=True, help="output folder or s3:// URI")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler (default: a local cluster)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds other files or a dataset from another input")
    _common(p)
    p.set_defaults(func=cmd_clean_data)

    for name, func, text in (("train", cmd_train, "train on Ray Train (the entry point `ray job submit` runs)"),
                             ("submit-train", cmd_submit_train, "ensure a Ray head and `ray job submit` training")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--data", required=True, help="refined dataset (folder with manifest.json) or s3:// URI")
        p.add_argument("--workers", type=int, help="Ray Train workers (config train.workers)")
        p.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl")
        p.add_argument("--storage", help="checkpoint storage: absolute path or s3:// (config train.storage)")
        p.add_argument("--name", help="run name (config train.name)")
        p.add_argument("--max-steps", type=int, help="stop after this many steps (config train.max_steps)")
        p.add_argument("--resume", help="checkpoint directory to start from")
        p.add_argument("--init-backbone", metavar="FILE.pth",
                       help="fine-tune from this backbone state dict (insightface's released IResNet/MobileFaceNet "
                            "files load as they are; config train.init_backbone)")
        if name == "submit-train":
            p.add_argument("--no-mlflow", action="store_true",
                           help="do not start the local MLflow server when MLFLOW_TRACKING_URI is unset")
        _common(p)
        p.set_defaults(func=func)

    p = sub.add_parser("denoise", help="stage 2 on Ray: de-noise a stage-1 dataset with a model's embeddings")
    p.add_argument("--data", required=True, help="stage-1 dataset (folder with manifest.json) or s3:// URI")
    p.add_argument("--model", required=True, help="checkpoint folder, models:/NAME@ALIAS or runs:/ID/embedder")
    p.add_argument("--out", required=True, help="the refined dataset (folder or s3:// URI)")
    p.add_argument("--trust-model-code", action="store_true",
                   help="allow --model to be an MLflow model folder, whose Python code runs when it is loaded")
    _common(p)
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser("refine", help="the paper's loop: stage 1 -> bootstrap model -> stage 2 (-> retrain)")
    p.add_argument("--input", required=True, help="raw dataset folder or s3:// URI")
    p.add_argument("--format", required=True, choices=["vggface2", "msceleb-tsv", "image-folder", "insightface-rec"])
    p.add_argument("--out", required=True, help="folder for stage1/, runs/, stage2/ (the refined dataset)")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler for stage 1")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if its stage1/ holds other files or a dataset from another input")
    p.add_argument("--retrain", action="store_true", help="train on the refined data at the end (denoise.retrain)")
    _common(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("holdout", help="move identities out of a refined dataset into evaluation sets")
    p.add_argument("--data", required=True, help="refined dataset (folder with manifest.json) or s3:// URI")
    p.add_argument("--out", required=True, help="the training dataset without them, with eval/ sets")
    p.add_argument("--identities", type=int, required=True, help="how many identities to hold out")
    p.add_argument("--pairs", type=int, default=600, help="verification pairs to build (half same-person)")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_holdout)

    p = sub.add_parser("evaluate", help="verification (10-fold, TAR@FAR, ROC) and 1:N identification of a model")
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/embedder, or a checkpoint folder")
    p.add_argument("--pairs", nargs="*", default=[], metavar="FILE",
                   help="insightface .bin pair sets and *_faces.parquet identification sets (local or s3://)")
    p.add_argument("--data", help="also every evaluation set that comes with this refined dataset")
    p.add_argument("--no-flip", action="store_true", help="skip the flip test (embedding + mirror embedding)")
    p.add_argument("--ijb", metavar="DIR", help="an IJB-B/IJB-C release folder (meta/, loose_crop/): template protocol")
    p.add_argument("--target", default="IJBC", choices=["IJBB", "IJBC"], help="which IJB release --ijb is")
    p.add_argument("--ijb-norm", action="store_true", help="IJB: weight image features by their norm")
    p.add_argument("--ijb-detector-score", action="store_true", help="IJB: weight image features by detector score")
    p.add_argument("--out", help="folder for evaluation.json and roc.png")
    p.add_argument("--trust-model-code", action="store_true",
                   help="allow --model to be an MLflow model folder, whose Python code runs when it is loaded")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="a model as ONNX, or a refined dataset as insightface RecordIO")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder or MLflow model URI (with --format onnx)")
    source.add_argument("--data", help="refined dataset (with --format rec)")
    p.add_argument("--format", dest="export_format", required=True, choices=["onnx", "rec"])
    p.add_argument("--out", required=True, help="ONNX file, or the folder for train.rec/train.idx/property")
    p.add_argument("--no-flip", action="store_true", help="ONNX: leave the flip test out of the graph")
    p.add_argument("--trust-model-code", action="store_true",
                   help="allow --model to be an MLflow model folder, whose Python code runs when it is loaded")
    _common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("promote", help="move the champion alias to a version only if it beats the champion")
    p.add_argument("--name", help="registered model (config train.registered_model)")
    p.add_argument("--version", required=True, help="version number, or 'latest'")
    p.add_argument("--metric", default="accuracy", help="accuracy, tar_at_far_0.01, rank1, ... (higher is better)")
    p.add_argument("--min-delta", type=float, default=0.0, help="required improvement (0: strictly better)")
    p.add_argument("--pairs", nargs="*", default=[], metavar="FILE",
                   help="evaluate both versions on these sets now (default: compare the figures recorded on them)")
    _common(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="move the champion alias back to the version it replaced")
    p.add_argument("--name", help="registered model (config train.registered_model)")
    _common(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("lineage", help="a registered version's run, config, dataset and evaluation")
    p.add_argument("--name", help="registered model (config train.registered_model)")
    p.add_argument("--version", default="champion", help="version number or alias")
    _common(p)
    p.set_defaults(func=cmd_lineage)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "format", "unset") is None:
        args.format = ["vggface2"]
    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config, args.overrides)
    except (OSError, ConfigError) as exc:
        log.error("config: %s", exc)
        return 2
    # MLflow retries a dead server for minutes by default; servers are checked up front
    # (infra.local_services.tracking_uri), so a few retries cover a blip.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import pickle

    from infra.local_services import ServiceError

    try:
        return int(args.func(args, cfg) or 0)
    except (OSError, ValueError, ServiceError, pickle.UnpicklingError) as exc:  # the last: refused .bin files
        # Bad input (a missing dataset, a file that is not what it claims): one clear line;
        # the traceback only with --log-level DEBUG.
        log.debug("traceback", exc_info=True)
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    except Exception as exc:
        if not type(exc).__module__.startswith("mlflow"):
            raise
        # The registry's answers (no such model, version or alias) are input errors too.
        log.debug("traceback", exc_info=True)
        log.error("MLflow: %s", (str(exc).strip().splitlines() or [type(exc).__name__])[0])
        return 1


if __name__ == "__main__":
    sys.exit(main())
