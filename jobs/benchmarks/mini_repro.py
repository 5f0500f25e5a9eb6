"""A miniature Gen-1 reproduction trained on CPU, whose t_s, w_t and image-prompt controls are measured.

    python -m jobs.benchmarks.mini_repro --out DIR [--minutes 45]

Real footage (Debian's opencv-doc clips: vtest.avi and tree.avi for training, Megamind.avi held out) goes
through the normal commands, called as a user calls them (`jobs.cli.main`, in this process):

1. ``gen1 preprocess`` of the training videos with ``--models mini`` (128x128 clips of 8 frames 4 apart,
   the mini preset's depth and CLIP: random but fixed), frames stored;
2. the ``mini`` VAE (`gen1.training.vae`) trained on the frames of those shards; its reconstruction PSNR
   measured on frames of the held-out video; then ``gen1 preprocess --latents`` again with it, so the
   training steps read latents instead of running the VAE;
3. ``gen1 train`` with the four packaged stages (jobs/train/stage1..4.yaml) and overrides for the mini
   scale: image-only; + temporal layers with 12.5% image batches; + structure at t_s = 0; t_s ~ U{0..7}.
   Each stage stops on its share of the time budget (``max_seconds``);
4. ``gen1 eval`` on the held-out video (its clips as a DAVIS-layout folder): our model over the grid
   t_s in {0, 2, 4, 7} x w_t in {0.5, 1, 1.5, 2} with two reference images as image prompts, and the
   per-frame baseline (the image model alone, at every t_s), measured and logged to MLflow;
5. the measures that need no pretrained model (`gen1.metrics`), from eval's per-video table and the videos:
   per w_t the flow-warp error and the frame-to-frame MSE (averaged over t_s), per t_s the correlation of
   input and output depth by the same depth model (eval's ``depth_fidelity``) and of their image
   gradients (averaged over w_t), and the colour-histogram distance of each output to its own reference
   image and to the other one. The per-frame baseline's beside ours (it has no w_t: one temporal figure).

Writes ``DIR/report.json`` (the keys of issue 19 plus ``per_frame``), ``DIR/details.json`` (phase seconds,
steps and losses of every stage, settings), ``DIR/plots/fig4_wt.png`` and ``DIR/plots/fig4_ts.png``, and an
MLflow run (experiment ``gen1-mini-repro``, a SQLite store under DIR, beside the train and eval runs).

The minutes are split by `Budget` (fractions of ``--minutes``); before each phase its share is taken of
the time still left, so a phase that ran over is paid for by the later ones. Depth and CLIP are tiny random
models, so outputs are labelled TINY RANDOM MODELS: the structure and content signals are functions of the
frames, but carry no semantics.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jobs.process_exit import exit_process

log = logging.getLogger("mini_repro")

OPENCV_DATA = Path(os.environ.get("GEN1_OPENCV_DATA", "/usr/share/doc/opencv-doc/examples/data"))
TRAIN_VIDEOS = ("vtest.avi", "tree.avi")
HELDOUT_VIDEO = "Megamind.avi"  # Megamind_bugy.avi is the same footage: used for neither
TS_VALUES = (0, 2, 4, 7)
WT_VALUES = (0.5, 1.0, 1.5, 2.0)
STAGES = ("stage1", "stage2", "stage3", "stage4")
EXPERIMENT = "gen1-mini-repro"
EVAL_RUN = "mini-eval"


@dataclass(frozen=True)
class Budget:
    """Shares of the total minutes, by phase (they sum to 1). Preprocess and eval are not stopped on time:
    their shares are what they are expected to take, left to them by the phases that are."""

    preprocess: float = 0.03
    vae: float = 0.10
    latents: float = 0.02
    stage1: float = 0.12
    stage2: float = 0.18
    stage3: float = 0.12
    stage4: float = 0.18
    eval: float = 0.25  # gen1 eval (our edits, the per-frame baseline, metrics) and the measures

    def __post_init__(self) -> None:
        total = sum(dataclasses.astuple(self))
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"budget fractions must sum to 1, found {total}")

    def share(self, phase: str, left_s: float, done: set[str]) -> float:
        """Seconds for ``phase`` out of ``left_s``: its fraction of the phases not ``done`` yet."""
        rest = [f.name for f in dataclasses.fields(self) if f.name not in done]
        return left_s * getattr(self, phase) / sum(getattr(self, p) for p in rest)


@dataclass(frozen=True)
class MiniConfig:
    """One miniature reproduction."""

    minutes: float = 45.0
    budget: Budget = field(default_factory=Budget)
    clips_per_video: int = 48  # training clips per training video (8 frames 4 apart: 29 source frames each)
    heldout_clips: int = 2  # held-out sequences cut from HELDOUT_VIDEO
    batch_size: int = 2  # clips per training step (an image step: batch_size * 8 frames)
    lr: float = 3e-4
    warmup_steps: int = 20
    vae_batch_size: int = 8
    edit_steps: int = 10  # DDIM steps of every edit
    guidance: float = 3.0  # w, content guidance
    seed: int = 0


class Clock:
    """Seconds since the start and per phase."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.t0 = time.monotonic()
        self.phases: dict[str, float] = {}

    @property
    def left_s(self) -> float:
        return self.total_s - (time.monotonic() - self.t0)

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.monotonic()
        log.info("== %s (%.0fs left of %.0fs)", name, self.left_s, self.total_s)
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - t, 1)


def gen1(*argv: str) -> str:
    """Run ``gen1 ARGV`` as the console script does (in this process); its stdout. Raises on a non-zero exit."""
    from jobs import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([str(a) for a in argv])
    text = out.getvalue()
    sys.stdout.write(text)
    if code != 0:
        raise RuntimeError(f"gen1 {argv[0]} exited {code}")
    return text


def last_json(text: str) -> dict[str, Any]:
    """The last line of ``text`` that is a JSON object (a command's summary)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON summary in the command's output: {text[-300:]!r}")


# ------------------------------------------------------------------------------------------------ data


def footage(out: Path) -> tuple[Path, Path]:
    """(folder of the training videos, copied under ``out``, the held-out video); `FileNotFoundError` when
    opencv-doc's clips are missing. (Copies: the preprocess listing does not follow symlinks.)"""
    missing = [n for n in (*TRAIN_VIDEOS, HELDOUT_VIDEO) if not (OPENCV_DATA / n).is_file()]
    if missing:
        raise FileNotFoundError(f"opencv-doc clips {missing} not in {OPENCV_DATA} (apt-get install opencv-doc, "
                                "or set GEN1_OPENCV_DATA)")
    train = out / "footage" / "train"
    train.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_VIDEOS:
        if not (train / name).exists():
            shutil.copyfile(OPENCV_DATA / name, train / name)
    return train, OPENCV_DATA / HELDOUT_VIDEO


def shard_frames(features: Path) -> np.ndarray:
    """Every stored frame of the feature shards: uint8 (n, h, w, 3)."""
    from pipelines.schema import read_shards, row_frames

    rows = read_shards(str(features), ["frames", "frames_format", "height", "width"]).to_pylist()
    if not rows:
        raise ValueError(f"{features}: no feature shards with frames")
    return np.concatenate([row_frames(r) for r in rows])


def heldout_sequences(video: Path, root: Path, count: int, frames: int, stride: int) -> list[str]:
    """``count`` sequences of ``(frames - 1) * stride + 1`` consecutive frames of ``video``, evenly spread, as a
    DAVIS-layout folder ``root/JPEGImages/480p/<name>/%05d.jpg`` (what `gen1 eval --dataset davis:` reads)."""
    import cv2

    span = (frames - 1) * stride + 1
    cap = cv2.VideoCapture(str(video))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    starts = np.linspace(0, total - span, count + 2).astype(int)[1:-1] if count else []
    names = []
    for k, start in enumerate(starts):
        name = f"{video.stem.lower()}-{k}"
        folder = root / "JPEGImages" / "480p" / name
        folder.mkdir(parents=True, exist_ok=True)
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(start))
        for i in range(span):
            ok, frame = cap.read()
            if not ok:
                raise ValueError(f"{video}: could not read frame {start + i}")
            cv2.imwrite(str(folder / f"{i:05d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
        names.append(name)
    cap.release()
    return names


def reference_images(train: Path, out: Path, size: tuple[int, int]) -> list[Path]:
    """One reference image per training video (its middle frame, centre-cropped to ``size``) for the image
    prompts: in the training distribution, and far apart in colour (a grey street, a green tree)."""
    from PIL import Image

    from gen1.decoding import load_clip, probe

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in TRAIN_VIDEOS:
        uri = str(train / name)
        frame = load_clip(uri, n=1, stride=1, start=probe(uri).num_frames // 2, size=size).frames[0]
        path = out / f"{Path(name).stem}.png"
        Image.fromarray(frame).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ phases


def train_vae_phase(cfg: MiniConfig, features: Path, heldout: Path, out: Path, seconds: float) -> dict[str, Any]:
    """Train the mini VAE on the shards' frames for ``seconds``; save it to ``out``; PSNR on held-out frames."""
    from gen1.config import MINI
    from gen1.decoding import load_clip, probe
    from gen1.metrics import psnr
    from gen1.training.vae import VaeTrainConfig, reconstruct, train_vae
    from gen1.weights import load_vae

    frames = shard_frames(features)
    vae = load_vae(MINI.vae)  # the mini VAE at its fixed random init
    result = train_vae(vae, frames, VaeTrainConfig(batch_size=cfg.vae_batch_size, max_seconds=max(seconds, 1.0),
                                                   seed=cfg.seed))
    vae.save_pretrained(out)
    n = probe(str(heldout)).num_frames
    test = np.concatenate([load_clip(str(heldout), n=8, stride=4, start=s, size=(MINI.width, MINI.height)).frames
                           for s in np.linspace(0, n - 29, 4).astype(int)])
    recon = reconstruct(vae, test)
    value = psnr(test.astype(np.float64) / 255.0, recon.astype(np.float64) / 255.0)
    return {"steps": result.steps, "seconds": round(result.seconds, 1), "last_loss": result.losses[-1],
            "train_frames": len(frames), "heldout_frames": len(test), "psnr": value}


def train_stage(cfg: MiniConfig, stage: str, features: Path, runs: Path, models: Path, seconds: float,
                tracking_uri: str) -> dict[str, Any]:
    """``gen1 train --config STAGE`` at mini scale, stopped after ``seconds`` of steps."""
    overrides = {
        "max_steps": 10**7, "max_seconds": max(seconds, 1.0), "global_batch_size": None, "batch_size": cfg.batch_size,
        "lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "mixed_precision": "no", "gradient_checkpointing": False,
        "checkpoint_every": 10**7, "log_every": 25,
        # stage 4's EMA (0.9999, for 10k steps) would keep a few hundred steps' weights at stage 3's
        "ema_decay": None,
    }
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    text = gen1("train", "--config", stage, "--data", features, "--output", runs / stage, "--models", models,
                "--device", "cpu", "--mlflow-uri", tracking_uri, "--experiment", EXPERIMENT, *sets)
    summary = last_json(text)
    return {k: summary[k] for k in ("steps", "last_loss", "seconds")}


def models_yaml(path: Path, **specs: str) -> Path:
    path.write_text(yaml.safe_dump({"base": "mini", **{k: str(v) for k, v in specs.items()}}))
    return path


def eval_phase(cfg: MiniConfig, heldout_root: Path, references: list[Path], models: Path, out: Path,
               tracking_uri: str) -> Path:
    """``gen1 eval`` of the held-out sequences: our grid and the per-frame baseline; the per-video table."""
    eval_cfg = {
        "dataset": f"davis:{heldout_root}", "models": str(models), "out": str(out),
        "grid": {"t_s": list(TS_VALUES), "w": [cfg.guidance], "w_t": list(WT_VALUES), "seeds": [cfg.seed]},
        "baselines": ["per_frame"], "steps": cfg.edit_steps, "frames": 8, "stride": 4,
        "prompts": [f"image:{p}" for p in references], "tracking_uri": tracking_uri, "experiment": EXPERIMENT,
        "run_name": EVAL_RUN, "sample_videos": 2, "num_cpus": 2, "progress": False,
    }
    path = out.parent / "eval.yaml"
    path.write_text(yaml.safe_dump(eval_cfg))
    gen1("eval", "--config", path, "--no-gate", "--max-failure-fraction", "0")
    return out / EVAL_RUN / "per_video.parquet"


# ------------------------------------------------------------------------------------------------ measures


def measure_rows(table, references: list[Path]):
    """Per output row of eval's table: frame_mse, grad_corr and the histogram distances to its own and the
    other references (with eval's flow_warp_error and depth_fidelity as depth_corr)."""
    import pandas as pd

    from gen1.metrics import colour_histogram, frame_mse, gradient_correlation, histogram_distance
    from gen1.video import read_image
    from pipelines.evaluate.stages import input_clip, read_video

    ref_hist = {str(p): colour_histogram(read_image(str(p))) for p in references}
    inputs: dict[str, np.ndarray] = {}
    rows = []
    for row in table.to_dict("records"):
        out = read_video(row["output_uri"])
        if row["clip_id"] not in inputs:
            inputs[row["clip_id"]] = input_clip(row).load_frames()
        frames_in = inputs[row["clip_id"]]
        hist = colour_histogram(out)
        own = str(row["image_uri"])
        rows.append({
            "method": row["method"], "t_s": row["t_s"], "w_t": row["w_t"], "clip_id": row["clip_id"],
            "flow_warp_error": row["flow_warp_error"], "frame_mse": frame_mse(out),
            "depth_corr": row["depth_fidelity"], "grad_corr": gradient_correlation(frames_in, out),
            "own": histogram_distance(hist, ref_hist[own]),
            "other": float(np.mean([histogram_distance(hist, h) for u, h in ref_hist.items() if u != own])),
        })
    return pd.DataFrame(rows)


def _means(df, by: str, values: tuple[str, ...], keys) -> dict[str, dict[str, float]]:
    return {_key(k): {v: float(df.loc[df[by] == k, v].mean()) for v in values} for k in keys}


def _key(value: float) -> str:
    """0 -> "0", 0.5 -> "0.5", 2.0 -> "2": the report's keys."""
    return f"{float(value):g}"


def report(measured) -> dict[str, Any]:
    """The report's measures (issue 19's keys and ``per_frame``) from `measure_rows`."""
    ours = measured[measured["method"] == "gen1"]
    base = measured[measured["method"] == "per_frame"]
    return {
        "wt": _means(ours, "w_t", ("flow_warp_error", "frame_mse"), WT_VALUES),
        "ts": _means(ours, "t_s", ("depth_corr", "grad_corr"), TS_VALUES),
        "image_prompt": {"own": float(ours["own"].mean()), "other": float(ours["other"].mean())},
        "per_frame": {
            "temporal": {"flow_warp_error": float(base["flow_warp_error"].mean()),
                         "frame_mse": float(base["frame_mse"].mean())},
            "ts": _means(base, "t_s", ("depth_corr", "grad_corr"), TS_VALUES),
            "image_prompt": {"own": float(base["own"].mean()), "other": float(base["other"].mean())},
        },
    }


def plots(rep: dict[str, Any], out: Path, label: str) -> list[Path]:
    """Fig. 4 style: temporal measures vs w_t, structure measures vs t_s; the per-frame baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, axis, metrics, base in (
        ("fig4_wt", "wt", ("flow_warp_error", "frame_mse"), rep["per_frame"]["temporal"]),
        ("fig4_ts", "ts", ("depth_corr", "grad_corr"), None),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        xs = [float(k) for k in rep[axis]]
        for ax, metric in zip(axes, metrics, strict=True):
            ax.plot(xs, [rep[axis][k][metric] for k in rep[axis]], "o-", label="gen1 (mini)")
            if base is not None:
                ax.axhline(base[metric], ls="--", color="grey", label="per-frame")
            else:
                ax.plot(xs, [rep["per_frame"]["ts"][k][metric] for k in rep["per_frame"]["ts"]], "s--",
                        color="grey", label="per-frame")
            ax.set_xlabel("w_t" if axis == "wt" else "t_s")
            ax.set_ylabel(metric)
            ax.legend()
        fig.suptitle(f"miniature Gen-1: {metrics[0]}, {metrics[1]} vs {'w_t' if axis == 'wt' else 't_s'} [{label}]",
                     fontsize=9)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def log_mlflow(tracking_uri: str, artifacts: str | None, rep: dict[str, Any], details: dict[str, Any],
               files: list[Path]) -> str:
    """One MLflow run of the reproduction: settings as params, every number of the report as a metric."""
    from pipelines import tracking

    with tracking.start_run(tracking_uri, artifacts, EXPERIMENT, "mini-repro", {"gen1.kind": "mini-repro"},
                            description=f"miniature Gen-1 reproduction in {rep['minutes']:.1f} min") as run:
        tracking.log_params(details["config"])
        tracking.log_metrics(flat_metrics(rep))
        for path in files:
            tracking.log_file(path)
        return run.info.run_id


def flat_metrics(rep: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"wt": {"0.5": {"frame_mse": x}}}`` -> ``{"wt/0.5/frame_mse": x}`` (finite numbers only)."""
    out: dict[str, float] = {}
    for k, v in rep.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{name}/"))
        elif isinstance(v, int | float) and math.isfinite(v):
            out[name] = float(v)
    return out


# ------------------------------------------------------------------------------------------------ run


def run(cfg: MiniConfig, out: Path) -> dict[str, Any]:
    """The whole reproduction into ``out``; returns the report (also written to ``out/report.json``)."""
    from gen1.config import MINI
    from pipelines.tracking import resolve_tracking_uri

    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(cfg.minutes * 60.0)
    tracking_uri, artifacts = resolve_tracking_uri(f"sqlite:///{(out / 'mlflow.db').resolve()}", out)
    features, latents, runs, models_dir = out / "features", out / "latents", out / "runs", out / "models"
    for path in (out / "footage", features, latents, runs, models_dir, out / "eval", out / "heldout"):
        shutil.rmtree(path, ignore_errors=True)  # a fresh reproduction every time
    train, heldout = footage(out)
    done: set[str] = set()
    details: dict[str, Any] = {"config": _params(cfg), "stages": {}}

    with clock.phase("preprocess"):
        gen1("preprocess", train, features, "--models", "mini", "--clips-per-video", cfg.clips_per_video,
             "--frames-format", "raw", "--num-cpus", 2, "--no-progress")
    done.add("preprocess")
    with clock.phase("vae"):
        details["vae"] = train_vae_phase(cfg, features, heldout, models_dir / "vae",
                                         cfg.budget.share("vae", clock.left_s, done))
    done.add("vae")
    train_models = models_yaml(out / "models-train.yaml", vae=models_dir / "vae")
    with clock.phase("latents"):  # the same clips again, with latents of the trained VAE: no VAE in training
        gen1("preprocess", train, latents, "--models", train_models, "--clips-per-video", cfg.clips_per_video,
             "--latents", "--no-frames", "--num-cpus", 2, "--no-progress")
    done.add("latents")
    overhead = 0.0  # a train command's seconds outside its steps (start-up, export), measured
    for stage in STAGES:
        with clock.phase(stage):
            seconds = cfg.budget.share(stage, clock.left_s, done) - overhead
            t = time.monotonic()
            details["stages"][stage] = train_stage(cfg, stage, latents, runs, train_models, seconds, tracking_uri)
            overhead = max(0.0, time.monotonic() - t - max(seconds, 1.0))
        done.add(stage)
    with clock.phase("eval"):
        heldout_root = out / "heldout"
        names = heldout_sequences(heldout, heldout_root, cfg.heldout_clips, MINI.frames, MINI.frame_stride)
        references = reference_images(train, out / "references", (MINI.width, MINI.height))
        edit_models = models_yaml(out / "models.yaml", vae=models_dir / "vae", unet=runs / "stage4" / "final")
        table_path = eval_phase(cfg, heldout_root, references, edit_models, out / "eval", tracking_uri)
    import pandas as pd

    with clock.phase("measure"):
        measured = measure_rows(pd.read_parquet(table_path), references)
        measured.to_csv(out / "measured.csv", index=False)
        rep = report(measured)
        rep["vae_psnr"] = details["vae"]["psnr"]
        rep["minutes"] = round((time.monotonic() - clock.t0) / 60.0, 2)
        details.update(heldout_sequences=names, references=[str(p) for p in references], phases=clock.phases,
                       models=MINI.label())
        files = plots(rep, out / "plots", MINI.label())
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    details["mlflow_run_id"] = log_mlflow(tracking_uri, artifacts, rep, details,
                                          [out / "report.json", *files, out / "measured.csv"])
    details["phases"] = clock.phases
    (out / "details.json").write_text(json.dumps(details, indent=2, default=str))
    log.info("report: %s", json.dumps(rep))
    return rep


def _params(cfg: MiniConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.update({f"budget_{k}": v for k, v in d.pop("budget").items()})
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output folder (report.json, plots, mlflow.db, ...)")
    p.add_argument("--minutes", type=float, default=MiniConfig.minutes, help="total time budget (45)")
    p.add_argument("--clips-per-video", type=int, default=MiniConfig.clips_per_video)
    p.add_argument("--heldout-clips", type=int, default=MiniConfig.heldout_clips)
    p.add_argument("--edit-steps", type=int, default=MiniConfig.edit_steps)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = MiniConfig(minutes=args.minutes, clips_per_video=args.clips_per_video, heldout_clips=args.heldout_clips,
                     edit_steps=args.edit_steps)
    rep = run(cfg, args.out)
    print(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    exit_process(main())
