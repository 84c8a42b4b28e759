"""`arcface`: the one command-line interface. Make targets are thin calls of it.

Every command takes `--config FILE` (TOML) and `--set section.key=value` overrides; with
neither it runs on the embedded default (local services, local files, demo data). Long
commands also run on a Ray cluster: `arcface submit COMMAND ...` (see `arcface submit -h`).

`train.batch_size` is the GLOBAL batch: N workers each take batch_size / N and follow one
process's trajectory (arcface_torch's recipes give a per-GPU batch: 8 GPUs x 128 = 1024).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from cleaning.formats import RAW_FORMATS, format_help
from pipelines.protocols import DEFAULT_BLOCK, PROTOCOLS
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
    from pipelines.config import to_toml

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
    for key in ("identities", "images_per_identity", "seed", "workers", "rec_order"):
        value = getattr(args, key)
        if value is not None:
            setattr(demo, key, value)
    formats = list(FORMATS) if "all" in args.format else args.format
    start = time.perf_counter()
    summary = generate(args.out, demo, formats, progress=progress)
    if args.large_scale:
        from pipelines.large_scale import write_demo_releases

        releases = os.path.join(args.out, "large_scale")
        write_demo_releases(releases, seed=demo.seed)
        print(f"large-scale releases (megaface, trillion-pairs, mfr-all, ytf) in {releases}")
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


def cmd_stage1(args, cfg) -> int:
    from dataset import RefinedDataset
    from pipelines.stage1_dask import run_stage1

    out = run_stage1(args.input, args.format, RefinedDataset.create(args.out), cfg.clean, scheduler=args.scheduler,
                     overwrite=args.overwrite)
    _print_counts(out.manifest)
    print(f"shards, rejects and manifest in {out.uri} ({out.manifest.extra.get('seconds')} s)")
    return _report_status(out)


def cmd_copy(args, cfg) -> int:
    from dataset import storage

    count = storage.copy_tree(args.source, args.destination)
    print(f"copied {count} files: {args.source} -> {args.destination}")
    return 0


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
    from pipelines.config import validate

    validate(cfg)  # the options' values meet the same ranges as --set's (--workers 0 must not pass)


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


def _print_counts(manifest) -> None:
    c = manifest.counts
    print(f"read {c['read']}  kept {c['kept']}  rejected {c['rejected']}  identities {manifest.num_classes}")
    for stage, v in c.get("by_stage", {}).items():
        print(f"  {stage:10s} read {v['read']}  kept {v['kept']}  rejected {v['rejected']}")
    for reason, n in c["by_reason"].items():
        print(f"  {reason:40s} {n}")


def cmd_denoise(args, cfg) -> int:
    from dataset import RefinedDataset
    from pipelines.stage2_ray import run_stage2

    mlflow_uri = _use_tracking_server(cfg) if args.model.startswith(("models:/", "runs:/")) \
        else cfg.services.mlflow_tracking_uri
    from pipelines.models import require_trusted

    require_trusted(args.model, args.trust_model_code)
    out = run_stage2(RefinedDataset.open(args.data), RefinedDataset.create(args.out), args.model, cfg.denoise,
                     ray_address=cfg.services.ray_address, mlflow_uri=mlflow_uri)
    _print_counts(out.manifest)
    print(f"shards, rejects and manifest in {out.uri}")
    return _report_status(out)


def cmd_clean_data(args, cfg) -> int:
    from pipelines.clean_data import run_clean_data

    if args.retrain:
        cfg.denoise.retrain = True
    result = run_clean_data(args.input, args.format, args.out, cfg, scheduler=args.scheduler, overwrite=args.overwrite)
    _print_counts(result.stage2.manifest)
    print(f"bootstrap model: {result.bootstrap_checkpoint}")
    print(f"refined dataset: {result.stage2.uri} (report: {result.stage2.report_index})")
    c = result.stage2.manifest.counts
    report_result(kind="clean-data", read=c["read"], kept=c["kept"], rejected=c["rejected"],
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
    from pipelines.evaluate import dumps, evaluate_model, roc_png
    from pipelines.models import require_trusted

    pairs, faces = split_eval_sets(args.pairs)
    if args.data:
        more_pairs, more_faces = RefinedDataset.open(args.data).eval_sets()
        pairs, faces = pairs + more_pairs, faces + more_faces
    if not pairs and not faces and not args.ijb and not args.protocol:
        log.error("nothing to evaluate on: give --pairs FILE (.bin or *_faces.parquet), --data DATASET, --ijb DIR "
                  "or --protocol P --release DIR")
        return 2
    if args.model.startswith(("models:/", "runs:/")):
        _use_tracking_server(cfg)
    require_trusted(args.model, args.trust_model_code)
    results, model_uri = {}, args.model
    if pairs or faces or args.ijb:
        done = evaluate_model(args.model, pairs, faces, flip=not args.no_flip, ijb_root=args.ijb or "",
                              ijb_target=args.target, ijb_norm=args.ijb_norm,
                              ijb_detector_score=args.ijb_detector_score, workers=args.workers, gpu=args.gpu,
                              ray_address=cfg.services.ray_address)
        results, model_uri = done.results, done.model_uri
        if done.ijb_name:
            from pipelines import ijb

            print(ijb.table(done.ijb_name, results[done.ijb_name]))
    if args.protocol:
        from pipelines import large_scale
        from pipelines.models import load_embedder, pin_model_uri

        model_uri = pin_model_uri(args.model)
        results.update(large_scale.run_protocol(args, cfg, load_embedder(model_uri).embedder))
    if results and args.model.startswith("models:/"):
        # every set's figures as eval.<set>.<metric> tags of the version (what promote gates
        # on) and metrics of its run: the .bin sets', IJB's and the large-scale protocols'
        from pipelines.registry import record_evaluation

        print(f"recorded on {record_evaluation(model_uri, results)}")
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

    if args.export_format in ("onnx", "pth"):
        if not args.model:
            raise ValueError(f"--format {args.export_format} exports a model: give --model")
        if args.model.startswith(("models:/", "runs:/")):
            _use_tracking_server(cfg)
        from pipelines.models import require_trusted

        require_trusted(args.model, args.trust_model_code)
        if args.export_format == "pth":
            r = export.export_pth(args.model, args.out, overwrite=args.overwrite)
            print(f"backbone state dict ({r.tensors} tensors, sha256 {r.sha256[:12]}): {r.path}")
            print(f"loads with arcface_torch's get_model({r.insightface!r}).load_state_dict(torch.load(...))"
                  if r.insightface else f"{r.backbone} has no arcface_torch counterpart; --init-backbone takes it")
            return 0
        result = export.export_onnx(args.model, args.out, flip=not args.no_flip, layout=args.layout,
                                    overwrite=args.overwrite)
        if result.layout == "insightface":
            print(f"ONNX (opset {result.opset}, insightface layout: float32 'data' (N,3,112,112) normalised as "
                  f"(x-127.5)/127.5, raw embedding out, no flip): {result.path}")
        else:
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
    count = export.export_rec(data, args.out, overwrite=args.overwrite)
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
                           pair_uris=pairs, face_uris=faces, workers=args.workers, gpu=args.gpu,
                           ray_address=cfg.services.ray_address)
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


def cmd_submit(args, cfg) -> int:
    """`arcface submit [OPTIONS] COMMAND ARGS...`: ARGS are checked here with COMMAND's own parser
    and config, then the command runs as a Ray job (pipelines/submit.py)."""
    from pipelines import submit

    command = COMMANDS_BY_NAME[args.target]
    inner = build_parser().parse_args([command.name, *args.argv])  # exits on a bad argument, here
    cfg = load_settings(inner)
    if command.check_before_submit:
        command.check_before_submit(inner, cfg)
    return submit.submit(command.name, args.argv, command.paths, cfg, submit.options_from(args))


def _check_train_input(args, cfg) -> None:
    """What would fail in the training job on every attempt fails here, before submission
    (the data must be readable from here: s3://, or a local path for the local head)."""
    from dataset import RefinedDataset, storage
    from pipelines.training.driver import check_input

    _train_overrides(args, cfg)
    if storage.is_s3(args.data) or os.path.exists(args.data):
        check_input(RefinedDataset.open(args.data), cfg.train, cfg.margin)


# -- the command table: each command's options, its handler, and what `submit` needs to know --

def _format_option(p, **kwargs) -> None:
    """--format, its choices and their one-line help from the format registry (cleaning/formats)."""
    described = "; ".join(f"{name}: {text}" for name, text in format_help().items())
    p.add_argument("--format", choices=kwargs.pop("choices", RAW_FORMATS),
                   help=f"{kwargs.pop('help', 'raw layout')} ({described})", **kwargs)


def _args_run(p) -> None:
    p.add_argument("--input", default="data/demo/raw", help="raw dataset (default: the demo, generated if missing)")
    _format_option(p, dest="input_format", default="vggface2")
    p.add_argument("--out", default="data/demo/refined", help="folder for stage1/, runs/, stage2/")
    p.add_argument("--model", default=None, help="registered model to promote (default: train.registered_model)")
    p.add_argument("--demo-raw", default="data/demo/raw", help=argparse.SUPPRESS)
    p.set_defaults(config="configs/demo-train.toml")


def _args_config(p) -> None:
    p.add_argument("action", choices=["show"])
    p.add_argument("--origins", action="store_true",
                   help="say after each value where it came from: default, file, environment or --set")


def _args_services(p) -> None:
    p.add_argument("action", choices=["up", "down", "status", "env"],
                   help="up: start (idempotent); down: stop all; status: who answers; env: shell exports")
    p.add_argument("--s3", action="store_true", help="also start (or export) the local S3 endpoint (moto)")
    p.add_argument("--only", metavar="LIST", help="comma-separated subset of ray,mlflow,s3")


def _args_demo_data(p) -> None:
    p.add_argument("--out", required=True, help="output folder")
    _format_option(p, action="append", choices=[*RAW_FORMATS, "all"], default=None,
                   help="raw layout; repeatable; 'all' writes each into a subfolder (default vggface2)")
    p.add_argument("--identities", type=int, help="number of training identities (config demo.identities)")
    p.add_argument("--images-per-identity", type=int, help="images per identity (config demo.images_per_identity)")
    p.add_argument("--seed", type=int, help="random seed; same seed, same bytes")
    p.add_argument("--workers", type=int, help="render processes (config demo.workers)")
    p.add_argument("--large-scale", action="store_true",
                   help="also write a small synthetic release of each large-scale protocol under OUT/large_scale/")
    p.add_argument("--rec-order", choices=["index", "face2rec2"],
                   help="insightface-rec record order: index, or face2rec2's (images first; config demo.rec_order)")


def _args_none(p) -> None:
    pass


def _args_copy(p) -> None:
    p.add_argument("source", help="local file or folder, or s3:// URI")
    p.add_argument("destination", help="s3:// URI, or local folder")


def _args_stage1(p) -> None:
    p.add_argument("--input", required=True, help="raw dataset folder or s3:// URI")
    _format_option(p, required=True)
    p.add_argument("--out", required=True, help="output folder or s3:// URI")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler (default: a local cluster)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds other files or a dataset from another input")


def _args_train(p) -> None:
    p.add_argument("--data", required=True, help="refined dataset (folder with manifest.json) or s3:// URI")
    p.add_argument("--workers", type=int,
                   help="Ray Train workers in all, over every node (config train.workers); train.batch_size is the "
                        "global batch, split over them: 8 workers x 128 faces = batch_size 1024")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl")
    p.add_argument("--storage", help="checkpoint storage: absolute path or s3:// (config train.storage)")
    p.add_argument("--name", help="run name (config train.name)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (config train.max_steps)")
    p.add_argument("--resume", metavar="DIR|latest",
                   help="checkpoint folder to start from, or 'latest': the newest complete checkpoint of this "
                        "run name in train.storage")
    p.add_argument("--init-backbone", metavar="FILE.pth",
                   help="fine-tune from this backbone state dict (insightface's released arcface_torch backbones, "
                        "r18...r2060, mbf, mbf_large, ViT, load as they are; config train.init_backbone)")


def _args_submit_train(p) -> None:
    _args_train(p)
    from pipelines.submit import add_options

    add_options(p)


def _args_denoise(p) -> None:
    p.add_argument("--data", required=True, help="stage-1 dataset (folder with manifest.json) or s3:// URI")
    p.add_argument("--model", required=True, help="checkpoint folder, models:/NAME@ALIAS or runs:/ID/embedder")
    p.add_argument("--out", required=True, help="the refined dataset (folder or s3:// URI)")
    _trust(p)


def _trust(p) -> None:
    p.add_argument("--trust-model-code", action="store_true",
                   help="allow --model to be an MLflow model folder, whose Python code runs when it is loaded")


def _args_clean_data(p) -> None:
    p.add_argument("--input", required=True, help="raw dataset folder or s3:// URI")
    _format_option(p, required=True)
    p.add_argument("--out", required=True, help="folder (or s3:// URI) for stage1/, runs/, stage2/ (the refined dataset)")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler for stage 1")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if its stage1/ holds other files or a dataset from another input")
    p.add_argument("--retrain", action="store_true", help="train on the refined data at the end (denoise.retrain)")


def _args_holdout(p) -> None:
    p.add_argument("--data", required=True, help="refined dataset (folder with manifest.json) or s3:// URI")
    p.add_argument("--out", required=True, help="the training dataset without them, with eval/ sets")
    p.add_argument("--identities", type=int, required=True, help="how many identities to hold out")
    p.add_argument("--pairs", type=int, default=600, help="verification pairs to build (half same-person)")
    p.add_argument("--seed", type=int, default=0)


def _args_evaluate(p) -> None:
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
    _embedding_workers(p)
    _trust(p)
    # Large-scale protocols (pipelines/large_scale.py): blocks of the similarity matrix as Ray tasks.
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="a large-scale benchmark release given with --release: MegaFace Challenge 1, "
                        "Trillion-Pairs, MFR-ALL-style all-to-all, YouTube Faces (--gpu: blocks on GPUs too)")
    p.add_argument("--release", metavar="DIR", help="the release folder (local or s3://) of --protocol")
    p.add_argument("--features", metavar="DIR",
                   help="precomputed feature shards, one folder per role (probes/, distractors/, elfw/, "
                        "images/, frames/), rows in the release lists' order")
    p.add_argument("--work", metavar="DIR", help="where embedded feature shards go (default: a temp folder)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK,
                   help="rows per block: a task scores two blocks (memory per task ~ 2 blocks + a tile)")
    p.add_argument("--far", type=float, action="append", metavar="FAR",
                   help="a FAR target (repeat for several; default: the protocol's, down to 1e-9 for Trillion-Pairs)")


def _embedding_workers(p) -> None:
    p.add_argument("--workers", type=int, default=0,
                   help="embed the images in this many Ray actors (on the cluster in RAY_ADDRESS, else a local "
                        "Ray), each reading its images itself; 0: in this process")
    p.add_argument("--gpu", action="store_true", help="embed on GPUs: one per actor with --workers, else this "
                                                       "process's")


def _args_export(p) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder or MLflow model URI (with --format onnx or pth)")
    source.add_argument("--data", help="refined dataset (with --format rec)")
    p.add_argument("--format", dest="export_format", required=True, choices=["onnx", "pth", "rec"])
    p.add_argument("--layout", choices=["serving", "insightface"], default="serving",
                   help="ONNX: serving = uint8 (N,112,112,3) in, L2-normalised out, flip inside; insightface = as "
                        "arcface_torch's torch2onnx.py: float32 NCHW 'data' normalised by the caller as "
                        "(x-127.5)/127.5, raw embedding out, no flip")
    p.add_argument("--out", required=True, help="ONNX or .pth file, or the folder for train.rec/train.idx/property")
    p.add_argument("--no-flip", action="store_true", help="ONNX serving layout: leave the flip test out of the graph")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _trust(p)


def _args_promote(p) -> None:
    p.add_argument("--name", help="registered model (config train.registered_model)")
    p.add_argument("--version", required=True, help="version number, or 'latest'")
    p.add_argument("--metric", default="accuracy", help="accuracy, tar_at_far_0.01, rank1, ... (higher is better)")
    p.add_argument("--min-delta", type=float, default=0.0, help="required improvement (0: strictly better)")
    p.add_argument("--pairs", nargs="*", default=[], metavar="FILE",
                   help="evaluate both versions on these sets now (default: compare the figures recorded on them)")
    _embedding_workers(p)


def _args_name(p) -> None:
    p.add_argument("--name", help="registered model (config train.registered_model)")


def _args_lineage(p) -> None:
    _args_name(p)
    p.add_argument("--version", default="champion", help="version number or alias")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[..., int]
    # Options whose values are files or folders: `arcface submit` checks that the cluster can
    # read them (s3://), and a command with any can be submitted as a Ray job.
    paths: tuple[str, ...] = ()
    submittable: bool = False
    check_before_submit: Callable | None = None  # what would fail in the job on every attempt
    # Other names that run the same command (older names users' scripts may still call).
    aliases: tuple[str, ...] = ()


COMMANDS = (
    Command("run", "the main job: demo data -> clean-data -> train -> promote, with progress and a summary",
            _args_run, cmd_run),
    Command("config", "show the effective config", _args_config, cmd_config_show),
    Command("services", "start, stop or inspect the local Ray head, MLflow server and S3 endpoint", _args_services,
            cmd_services),
    Command("demo-data", "write the synthetic raw demo dataset with known defects", _args_demo_data, cmd_demo_data),
    Command("fetch-weights", "fetch the MTCNN weights into the cache (make setup does this)", _args_none,
            cmd_fetch_weights),
    Command("copy", "copy a folder (raw data, evaluation sets) to S3 or back: what a cluster reads",
            _args_copy, cmd_copy),
    Command("clean-data", "the paper's refinement loop (make clean-data): stage 1 -> bootstrap model -> stage 2 "
            "(-> retrain)", _args_clean_data, cmd_clean_data, paths=("--input", "--out"), submittable=True,
            aliases=("refine",)),
    Command("stage1", "stage 1 alone, on Dask: raw dataset -> aligned, filtered Parquet shards", _args_stage1,
            cmd_stage1, paths=("--input", "--out"), submittable=True),
    Command("train", "train on Ray Train (what a submitted training job runs)", _args_train, cmd_train,
            paths=("--data", "--storage", "--resume", "--init-backbone"), submittable=True,
            check_before_submit=_check_train_input),
    Command("denoise", "stage 2 alone, on Ray: de-noise a stage-1 dataset with a model's embeddings", _args_denoise,
            cmd_denoise, paths=("--data", "--model", "--out"), submittable=True, aliases=("stage2",)),
    Command("holdout", "move identities out of a refined dataset into evaluation sets", _args_holdout, cmd_holdout),
    Command("evaluate", "verification (10-fold, TAR@FAR, ROC) and 1:N identification of a model", _args_evaluate,
            cmd_evaluate, paths=("--model", "--pairs", "--data", "--ijb", "--out", "--release", "--features", "--work"),
            submittable=True),
    Command("export", "a model as ONNX, or a refined dataset as insightface RecordIO", _args_export, cmd_export),
    Command("promote", "move the champion alias to a version only if it beats the champion", _args_promote,
            cmd_promote),
    Command("rollback", "move the champion alias back to the version it replaced", _args_name, cmd_rollback),
    Command("lineage", "a registered version's run, config, dataset and evaluation", _args_lineage, cmd_lineage),
)
COMMANDS_BY_NAME = {name: c for c in COMMANDS for name in (c.name, *c.aliases)}
SUBMITTABLE = tuple(c.name for c in COMMANDS if c.submittable)
# `submit-train ARGS` is `submit train ARGS`, with submit's own options taken from anywhere in ARGS.
SUBMIT_OPTIONS = {"--working-dir": 1, "--cluster-path": 0, "--no-wait": 0, "--no-mlflow": 0}


def _args_submit(p) -> None:
    from pipelines.submit import add_options

    add_options(p)
    p.add_argument("target", metavar="COMMAND", choices=[name for name, c in COMMANDS_BY_NAME.items() if c.submittable],
                   help=f"one of {', '.join(SUBMITTABLE)}")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="COMMAND's own options, as for `arcface COMMAND` (--config and --set included)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arcface", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, aliases=list(command.aliases))
        command.arguments(p)
        _common(p)
        p.set_defaults(func=command.run)
    p = sub.add_parser("submit", help=f"run a long command ({', '.join(SUBMITTABLE)}) as a Ray job on a cluster, "
                                      "following its logs",
                       description="Runs `arcface COMMAND ARGS` as a Ray job (Ray's Jobs SDK) on the cluster in "
                                   "RAY_ADDRESS (a dashboard URL), else on the local head. The job runs the cluster's "
                                   "installed arcface with this command's effective config, sent by content; local "
                                   "paths are refused unless they are s3:// or --cluster-path says the cluster has "
                                   "them. The exit code is the job's; Ctrl-C leaves the job running.")
    _args_submit(p)
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("submit-train", help="alias of `submit train` (its options may come anywhere)")
    _args_submit_train(p)
    _common(p)
    return parser


def _expand_alias(argv: list[str]) -> list[str]:
    if not argv or argv[0] != "submit-train" or "-h" in argv or "--help" in argv:
        return argv
    own, rest, i = [], [], 1
    while i < len(argv):
        word = argv[i]
        name = word.split("=", 1)[0]
        if name in SUBMIT_OPTIONS:
            takes = SUBMIT_OPTIONS[name] and "=" not in word
            own += argv[i:i + 1 + takes]
            i += 1 + takes
            continue
        rest.append(word)
        i += 1
    return ["submit", *own, "train", *rest]


def load_settings(args):
    """The config a command runs with: file, environment and --set (checked once)."""
    from pipelines.config import load_config

    return load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    argv = _expand_alias(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    if getattr(args, "format", "unset") is None:
        args.format = ["vggface2"]
    setup_logging(args.log_level if hasattr(args, "log_level") else None)
    from pipelines.config import ConfigError

    try:
        # `submit` reads the config of the command it submits, from that command's options.
        cfg = None if args.command == "submit" else load_settings(args)
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
    except ConfigError as exc:
        log.error("config: %s", exc)
        return 2
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
