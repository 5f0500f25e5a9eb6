"""`gen1 train --workers 2`: a two-worker Ray Train run (DDP over gloo) on the local multi-node Ray cluster,
streaming the feature shards with Ray Data and logging to a real MLflow tracking server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gen1.config import TINY
from tests.test_training import load_tiny_features, shard_rows_from_clips, write_feature_shards

MLFLOW_STARTUP_S = 240.0  # migrations + app import take a minute or more on 2 busy cores

RUN_COMMAND = (
    "import sys, argparse, logging\n"
    "from jobs.commands import train\n"
    "logging.basicConfig(level=logging.INFO)\n"
    "p = argparse.ArgumentParser(); s = p.add_subparsers(); train.register(s)\n"
    "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(url, timeout=2).read()
    except urllib.error.HTTPError:
        return False
    except OSError:
        return False
    return True


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    """``mlflow server`` (sqlite backend) on a free 127.0.0.1 port; yields its URI; stopped by pid after."""
    root = tmp_path / "mlflow"
    root.mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "NO_PROXY": "127.0.0.1,localhost"}
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
             "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + MLFLOW_STARTUP_S
        while not _answers(f"{url}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server on {url} did not start within {MLFLOW_STARTUP_S:.0f}s "
                            f"(exit {proc.poll()}):\n{(root / 'server.log').read_text()[-3000:]}", pytrace=False)
            time.sleep(1.0)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session this fixture started (uvicorn's children)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_worker_ray_train_run_logs_to_mlflow(real_clips, tiny_models, ray_cluster, mlflow_server, tmp_path):
    data = str(tmp_path / "pre")
    write_feature_shards(data, shard_rows_from_clips(real_clips, load_tiny_features()), parts=2)
    output = tmp_path / "runs" / "stage3"
    args = [
        "train", "--config", "stage3", "--data", data, "--output", str(output), "--models", "tiny",
        "--workers", "2", "--cpus-per-worker", "0.5", "--ray-address", ray_cluster.address,
        "--ray-storage", str(tmp_path / "ray"), "--mlflow-uri", mlflow_server, "--experiment", "ray-test",
        "--max-steps", "4", "--init-from", TINY.unet,
        "--set", "global_batch_size=null", "--set", "batch_size=1", "--set", "grad_accum=2",
        "--set", "frames=null", "--set", "image_batch_prob=0.5", "--set", "checkpoint_every=2",
        "--set", "log_every=1", "--set", "mixed_precision=no", "--set", "gradient_checkpointing=false",
    ]
    env = {**ray_cluster.env, "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.run([sys.executable, "-c", RUN_COMMAND, *args], env=env, capture_output=True, text=True,
                          timeout=800, cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.returncode == 0, f"gen1 train --workers 2 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 2 and summary["tiny_models"] is True

    # both workers wrote their RNG state into every checkpoint; the final weights load
    ckpt = output / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-00000004"
    assert {p.name for p in (ckpt / "step-00000004").iterdir()} >= {"model", "state.pt", "rng-0.pt", "rng-1.pt"}
    import torch

    from gen1.unet import VideoUNet

    state = torch.load(ckpt / "step-00000004" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and set(state["data"]) == {0, 1}
    VideoUNet.from_pretrained(output / "final")

    # MLflow: one finished run with the config as params and loss / lr / throughput at every step
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("ray-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["stage"] == "stage3-structure"
    for key in ("loss", "lr", "steps_per_s", "samples_per_s", "frames_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4], key
        assert all(m.value > 0 and m.value == m.value for m in history), key
    # what the run page shows: the shards as its input, its summary line, the whole config (issue 18)
    (used,) = run.inputs.dataset_inputs
    assert (used.dataset.name, json.loads(used.dataset.source)) == ("pre feature shards", {"uri": data})
    assert run.data.tags["mlflow.note.content"].startswith("trained stage3-structure: steps 0 -> 4 in ")
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(config).read_text())["max_steps"] == 4

