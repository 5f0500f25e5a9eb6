"""Checkpoints and exported weights under a run's output URI: the store, and writing, committing and exporting.

A checkpoint is written under ``checkpoints/.tmp-<name>`` and committed by renaming it and then updating
``latest``, so a reader never sees half a checkpoint.

Checkpoints may sit in a shared bucket, so they are read with ``torch.load(..., weights_only=True)``: tensors
and plain values only. A file holding any other pickled object (whose loading could run code) is refused
with `UnsafeCheckpointError`. Files copied to local disk keep to their directory (`gen1.destinations`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from gen1.destinations import destination
from gen1.training.config import TrainConfig
from gen1.training.distributed import Runtime, full_weights, gather_objects
from gen1.training.state import TrainState

if TYPE_CHECKING:
    from gen1.training.tasks import PriorTask, UNetTask

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
FINAL = "final"
MODEL_DIR = "model"
STATE_FILE = "state.pt"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds pickled objects other than tensors and plain values: refused unloaded."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_file(rank: int) -> str:
    """A checkpoint's file of worker ``rank``'s random streams."""
    return f"rng-{rank}.pt"


class CheckpointStore:
    """Checkpoints and exported weights under one output URI (local path or any fsspec URI)."""

    def __init__(self, output: str):
        self.output = output
        self.fs, root = fsspec.core.url_to_fs(output)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            root = self.fs._strip_protocol(root)
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts)) if not self.local else self.path(*parts)

    # -- reading ------------------------------------------------------------------------------------------

    def latest(self) -> str | None:
        """Name of the newest committed checkpoint, or None."""
        pointer = self.path(CHECKPOINTS_DIR, LATEST)
        if not self.local:
            self.fs.invalidate_cache(self.root)  # another worker or run may have written since
        if not self.fs.exists(pointer):
            return None
        name = self.fs.cat_file(pointer).decode().strip()
        if not self.fs.exists(self.path(CHECKPOINTS_DIR, name, STATE_FILE)):
            raise FileNotFoundError(f"{self.uri(CHECKPOINTS_DIR, LATEST)} names {name!r}, which has no {STATE_FILE}")
        return name

    def checkpoints(self) -> list[str]:
        """Committed checkpoint names, oldest first."""
        try:
            entries = self.fs.ls(self.path(CHECKPOINTS_DIR), detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if n.startswith("step-"))

    def read_torch(self, *parts: str) -> Any:
        """A file written by `write_torch`, loaded with ``weights_only=True``; `UnsafeCheckpointError` for one
        holding anything else."""
        data = self.fs.cat_file(self.path(*parts))
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UnsafeCheckpointError(
                f"refusing to load {self.uri(*parts)}: expected tensors and plain values only, found other "
                f"pickled objects, which loading could run as code (torch.load weights_only=True: {first}). "
                "Checkpoints written by this version hold none; do not load files from untrusted writers"
            ) from err

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    @contextlib.contextmanager
    def local_dir(self, *parts: str) -> Iterator[Path]:
        """A local directory holding ``parts`` (the directory itself when the output is local)."""
        if self.local:
            yield Path(self.path(*parts))
            return
        with tempfile.TemporaryDirectory(prefix="gen1-ckpt-") as tmp:
            remote = self.path(*parts)
            for src in self.fs.find(remote):
                dst = destination(Path(tmp), src[len(remote) :], source=src)
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(src, str(dst))
            yield Path(tmp)

    # -- writing ------------------------------------------------------------------------------------------

    def write_bytes(self, data: bytes, *parts: str) -> None:
        path = self.path(*parts)
        if self.local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def write_torch(self, obj: Any, *parts: str) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(buf.getvalue(), *parts)

    def upload_dir(self, local: Path, *parts: str) -> None:
        for src in sorted(p for p in local.rglob("*") if p.is_file()):
            self.write_bytes(src.read_bytes(), *parts, *src.relative_to(local).parts)

    def remove(self, *parts: str) -> None:
        if self.fs.exists(self.path(*parts)):
            self.fs.rm(self.path(*parts), recursive=True)

    def commit_dir(self, tmp_parts: Sequence[str], final_parts: Sequence[str]) -> None:
        """Move a finished directory to its final name: a rename locally; on object stores a copy of every
        object then the removal of the temporary ones (the ``latest`` pointer, written after, commits)."""
        self.remove(*final_parts)
        src, dst = self.path(*tmp_parts), self.path(*final_parts)
        if self.local:
            self.fs.mv(src, dst, recursive=True)
            return
        self.fs.invalidate_cache(src)
        for path in self.fs.find(src):
            self.fs.copy(path, dst + path[len(src) :])
        self.fs.rm(src, recursive=True)
        self.fs.invalidate_cache(self.root)

    def set_latest(self, name: str) -> None:
        if not self.local:  # one object PUT is atomic
            self.write_bytes(name.encode(), CHECKPOINTS_DIR, LATEST)
            return
        tmp = f".{LATEST}.tmp"
        self.write_bytes(name.encode(), CHECKPOINTS_DIR, tmp)
        self.fs.mv(self.path(CHECKPOINTS_DIR, tmp), self.path(CHECKPOINTS_DIR, LATEST))

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` committed checkpoints."""
        names = self.checkpoints()
        for name in names[: max(0, len(names) - keep)]:
            self.remove(CHECKPOINTS_DIR, name)


def check_output(output: str, resume: bool) -> None:
    """Refuse to start a fresh run over an output that already holds checkpoints (unless resuming)."""
    if resume:
        return
    latest = CheckpointStore(output).latest()
    if latest is not None:
        raise FileExistsError(
            f"{output} already holds checkpoint {latest}; pass --resume to continue it or choose a new output"
        )


def save_checkpoint(
    store: CheckpointStore, state: TrainState, task: UNetTask | PriorTask, runtime: Runtime, cfg: TrainConfig
) -> str:
    """Write checkpoint ``state.step`` (every worker its RNG and data position), commit it, move ``latest``."""
    name = checkpoint_name(state.step)
    tmp = f".tmp-{name}"
    if runtime.is_main:
        store.remove(CHECKPOINTS_DIR, tmp)
    runtime.barrier()
    worker = state.state_dict(shared=runtime.is_main)  # collective under FSDP
    data_states = gather_objects(worker.pop("data"), runtime)
    store.write_torch(worker.pop("rng"), CHECKPOINTS_DIR, tmp, rng_file(runtime.rank))
    with full_weights(state.model, runtime):
        if runtime.is_main:
            with tempfile.TemporaryDirectory(prefix="gen1-save-") as local:
                task.save_model(Path(local) / MODEL_DIR)
                store.upload_dir(Path(local), CHECKPOINTS_DIR, tmp)
            shared = {**worker, "data": dict(enumerate(data_states)), "world_size": runtime.world_size,
                      "config": cfg.as_dict()}
            store.write_torch(shared, CHECKPOINTS_DIR, tmp, STATE_FILE)
    runtime.barrier()
    if runtime.is_main:
        store.commit_dir((CHECKPOINTS_DIR, tmp), (CHECKPOINTS_DIR, name))
        store.set_latest(name)
        store.prune(cfg.keep_checkpoints)
        log.info("checkpoint %s", store.uri(CHECKPOINTS_DIR, name))
    runtime.barrier()
    return name


def load_checkpoint(store: CheckpointStore, name: str, state: TrainState, runtime: Runtime) -> None:
    """Restore ``state`` from checkpoint ``name``: the shared state, this worker's data position and RNG.

    A worker the checkpoint has no data position for (a run resumed with more workers) takes worker 0's;
    one without an RNG file restarts its random streams.
    """
    saved = store.read_torch(CHECKPOINTS_DIR, name, STATE_FILE)
    data = saved["data"]
    saved["data"] = data[runtime.rank] if runtime.rank in data else data[0]
    rng = rng_file(runtime.rank)
    saved["rng"] = None
    if store.exists(CHECKPOINTS_DIR, name, rng):
        saved["rng"] = store.read_torch(CHECKPOINTS_DIR, name, rng)
    else:
        log.warning("checkpoint %s has no %s (different worker count): random streams restart", name, rng)
    state.load_state_dict(saved, source=f"checkpoint {name}")
    log.info("resumed from %s at step %d", store.uri(CHECKPOINTS_DIR, name), state.step)


def export_final(store: CheckpointStore, task: UNetTask | PriorTask, state: TrainState, runtime: Runtime) -> str:
    """The inference weights (EMA weights when EMA is on) to ``OUTPUT/final``, committed by rename."""
    tmp = f".tmp-{FINAL}"
    ema = state.ema
    with full_weights(state.model, runtime):
        if runtime.is_main:
            store.remove(tmp)
            swap = ema.swapped() if ema is not None else contextlib.nullcontext()
            with swap, tempfile.TemporaryDirectory(prefix="gen1-final-") as local:
                task.save_model(Path(local))
                store.upload_dir(Path(local), tmp)
            store.commit_dir((tmp,), (FINAL,))
            log.info("exported %s weights to %s", "EMA" if ema is not None else "final", store.uri(FINAL))
    runtime.barrier()
    return store.uri(FINAL)
