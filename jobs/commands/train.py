"""`gen1 train`: train a stage (or a customization, or the prior) from feature shards, here or on Ray Train."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from jobs.cli import HelpFormatter
from jobs.exit_codes import EXIT_BAD_INPUT, EXIT_OK, help_epilog

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "train"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from jobs.cli import add_models_argument

    p = sub.add_parser(
        "train",
        help="train the video UNet (a stage, a customization) or the prior",
        description="Train from the feature shards `gen1 preprocess` writes. One process by default; "
        "--workers N runs a Ray Train TorchTrainer with N workers (DDP, or FSDP by config). Checkpoints go "
        "to OUTPUT/checkpoints (any fsspec URI), the exported weights to OUTPUT/final. Stages chain by "
        "init_from: train stage1 into RUNS/stage1, stage2 into RUNS/stage2, and so on.",
        epilog=help_epilog(EXIT_OK, EXIT_BAD_INPUT),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        metavar="YAML",
        help=f"training config: a YAML file or the name of a packaged one ({', '.join(packaged_configs())})",
    )
    p.add_argument("--data", required=True, metavar="URI",
                   help="preprocess output (holding shards/), or for the prior a folder of images + .txt captions")
    p.add_argument("--output", required=True, metavar="URI", help="run directory for checkpoints and weights")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT's latest checkpoint")
    p.add_argument("--max-steps", type=int, default=None, help="override max_steps")
    p.add_argument("--init-from", default=None, metavar="SPEC", help="override init_from (weight spec or directory)")
    p.add_argument("--seed", type=int, default=None, help="override seed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, VALUE parsed as YAML (e.g. --set batch_size=2 --set ema_decay=null)",
    )
    p.add_argument("--workers", type=int, default=0,
                   help="Ray Train workers; 0 (default) trains in this process without Ray")
    p.add_argument("--gpu", action="store_true", help="Ray Train workers take one GPU each (NCCL)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per Ray Train worker (default 1)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--ray-storage", default=None, metavar="URI", help="Ray Train's storage_path for its run records")
    p.add_argument("--max-failures", type=int, default=0,
                   help="Ray Train worker-group restarts; each resumes from the latest checkpoint (0)")
    p.add_argument("--device", default=None, help="cpu | cuda for a one-process run (default: cuda if available)")
    p.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI; none: no MLflow logging)")
    p.add_argument("--experiment", default="gen1-train", help="MLflow experiment (gen1-train)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: the stage name)")
    add_models_argument(p)
    p.set_defaults(func=run)
    return p


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name: str) -> str:
    """A YAML path as given, or a packaged config by name (``stage1`` -> jobs/train/stage1.yaml)."""
    if Path(name).is_file() or "://" in name:
        return name
    packaged = CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return str(packaged)
    raise FileNotFoundError(f"training config {name!r} is neither a file nor one of {packaged_configs()}")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, found {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    import os

    from gen1.config import load_model_specs
    from gen1.training import TrainConfig
    from pipelines.tracking import MlflowTracker

    overrides = parse_overrides(args.set)
    overrides.update({k: v for k, v in {"max_steps": args.max_steps, "init_from": args.init_from,
                                         "seed": args.seed}.items() if v is not None})
    cfg = TrainConfig.from_yaml(config_path(args.config), **overrides)
    specs = load_model_specs(args.models)
    check_previous_stage(cfg, specs, args)
    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    tracker = MlflowTracker(uri, experiment=args.experiment, run_name=args.run_name or cfg.stage) if uri else None
    # the config is the run record's (OUTPUT/config.yaml, MLflow params); printed only with -v
    log.debug("gen1 train: %s (%s), config:\n%s", cfg.stage, specs.label(), cfg.to_yaml())
    if specs.is_tiny:
        log.warning("tiny random models: this run checks the plumbing; its weights are not a real model")
    if args.workers > 0:
        from pipelines.train import RayTrainSettings, train_with_ray

        settings = RayTrainSettings(
            num_workers=args.workers,
            use_gpu=args.gpu,
            cpus_per_worker=args.cpus_per_worker,
            ray_address=args.ray_address,
            storage_path=args.ray_storage,
            max_failures=args.max_failures,
        )
        result = train_with_ray(cfg, specs, args.data, args.output, settings, resume=args.resume, tracker=tracker)
        if result.error is not None:
            raise result.error
        summary = {"output": args.output, "workers": args.workers, "metrics": _plain(result.metrics)}
    else:
        from pipelines.train import train_local

        res = train_local(cfg, specs, args.data, args.output, resume=args.resume, tracker=tracker,
                          device=args.device)
        summary = {
            "output": res.output,
            "final": res.final,
            "steps": res.steps,
            "start_step": res.start_step,
            "last_loss": res.losses[-1] if res.losses else None,
            "seconds": round(res.seconds, 2),
            "mlflow_run_id": res.run_id,
        }
    summary.update(stage=cfg.stage, models=specs.label(), tiny_models=specs.is_tiny)
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0


def check_previous_stage(cfg, specs, args: argparse.Namespace) -> None:
    """A stage that starts from the previous one's output (``init_from: "{output_parent}/stage3/final"``)
    needs that output before any work starts: `WeightsNotFoundError` naming the stage to train first, or
    ``--init-from``. Not checked when ``--resume`` finds a checkpoint (the run continues from it)."""
    import fsspec

    from gen1.training.checkpoints import CheckpointStore
    from gen1.training.config import OUTPUT_PARENT, resolve_init
    from gen1.weights import WeightsNotFoundError

    if not cfg.init_from or OUTPUT_PARENT not in cfg.init_from:
        return
    if args.resume and CheckpointStore(args.output).latest() is not None:
        return
    init = resolve_init(cfg, specs, args.output)
    fs, path = fsspec.core.url_to_fs(init)
    if fs.isdir(path) and fs.ls(path):
        return
    previous_output = init.rstrip("/").rsplit("/", 1)[0]  # RUNS/stage3 of RUNS/stage3/final
    previous = previous_output.rsplit("/", 1)[-1]
    how = (f"gen1 train --config {previous} --data {args.data} --output {previous_output}"
           if previous in packaged_configs() else f"its run writes {init}")
    raise WeightsNotFoundError(
        f"{cfg.stage} starts from {init} (init_from {cfg.init_from!r}), which holds no weights: train "
        f"{previous} first ({how}), or pass --init-from SPEC (a weight spec, e.g. another run's final/)",
        spec=init, tried=[init])


def _plain(metrics) -> dict:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float | str)}
