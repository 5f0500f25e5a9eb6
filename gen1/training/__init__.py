"""Training Gen-1 the way the paper does: v-prediction, joint image/video batches, four stages, customization.

Loss (eq. 6 with v targets). For scaled VAE latents ``z0: (b, c, f, h, w)``, noise ``eps`` and
``t ~ U{0..T-1}`` per example::

    z_t = alpha_t z0 + sigma_t eps,   v = alpha_t eps - sigma_t z0,   L = || v - v_theta(z_t, t, s, c) ||^2

with the betas of `gen1.schedule.make_train_scheduler` (the sampler's own). ``s`` is the structure input
(the depth latent after ``t_s`` blur/downsample steps plus the ``t_s`` sinusoid channels, or zeros where a
stage does not use structure), ``c`` the CLIP image embedding of one random frame of the clip, replaced by
the null (zero) embedding with probability ``content_dropout`` for classifier-free guidance.

A step is either a video step or, with probability ``image_batch_prob``, an image step: every image is a
one-frame video run in image mode (``temporal=False``), so the temporal layers get no gradient. The choice
is drawn once per optimizer step from a generator shared by all workers, so data-parallel workers always
run the same kind of step. Image steps from an image corpus (``image_data``) are multi-resolution as in the
paper (§3.4): each image step draws one size from ``image_buckets`` and their transposes (sd15: 320x320,
384x320, 320x384, 448x256, 256x448) from that same generator, so every micro-batch of every worker is cut
to it; each image is scaled to cover the size (aspect kept), centre-cropped, and mirrored with probability
1/2 (``image_flip``). Image steps without ``image_data`` take frames of the clips at the clips' size
(448x256 for sd15), and video steps always do.

The paper's stages are `TrainConfig` files (``jobs/train/stage*.yaml``), not code paths: what is trainable
(``trainable``: parameter groups), whether images/videos/structure are used and the ``t_s`` range are
fields; each stage's ``init_from`` names the previous stage's exported weights.

A run writes under its output URI (any fsspec URI)::

    OUTPUT/config.yaml                          the config it ran with
    OUTPUT/checkpoints/step-00001000/model/     weights (the model's own save_pretrained)
    OUTPUT/checkpoints/step-00001000/state.pt   step, optimizer, LR schedule, EMA, data positions, tracker run
    OUTPUT/checkpoints/step-00001000/rng-<rank>.pt   every worker's RNG states
    OUTPUT/checkpoints/latest                   the name of the newest committed checkpoint
    OUTPUT/final/                               the exported weights (EMA weights when EMA is on)

A checkpoint is written under ``checkpoints/.tmp-<name>`` and committed by renaming it and then updating
``latest``; ``resume`` restores everything in it, so a run killed and resumed reaches the same weights as
one that ran through, and reports to the same tracker run.

Params, the config, the input data (a `TrainingData` the caller describes) and metrics go to a `Tracker`
the caller hands to `train` (``gen1 train`` passes `pipelines.tracking.MlflowTracker`); the library itself
imports neither MLflow nor Ray. Every ``log_every`` steps the main worker logs loss, throughput (steps/s,
samples/s, frames/s) and the ETA of ``max_steps``.

Modules: `config` (`TrainConfig`), `objective` (the loss and its random draws, pure), `trainable` (what a
stage unfreezes), `tasks` (the UNet's and the prior's data -> loss), `state` (`TrainState`: everything
resumed besides the weights), `checkpoints` (the store; save, load, export), `distributed` (`Runtime`,
DDP / FSDP), `tracking` (`Tracker`, `TrainingData`), `loop` (`train`).
"""

from gen1.training.checkpoints import CheckpointStore, check_output, checkpoint_name
from gen1.training.config import TrainConfig, output_parent, resolve_init
from gen1.training.distributed import Runtime
from gen1.training.loop import StepCallback, TrainResult, train
from gen1.training.objective import (
    UNetInputs,
    draw_image_size,
    draw_image_step,
    drop_content,
    frame_window,
    pick_content_frame,
    sample_structure_strength,
    sample_timesteps,
    v_prediction_loss,
)
from gen1.training.state import TrainState
from gen1.training.tasks import Cursor, PriorTask, UNetTask, build_task
from gen1.training.tracking import Tracker, TrainingData
from gen1.training.trainable import Trainable, select_trainable

__all__ = [
    "CheckpointStore",
    "Cursor",
    "PriorTask",
    "Runtime",
    "StepCallback",
    "Tracker",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainable",
    "TrainingData",
    "UNetInputs",
    "UNetTask",
    "build_task",
    "check_output",
    "checkpoint_name",
    "draw_image_size",
    "draw_image_step",
    "drop_content",
    "frame_window",
    "output_parent",
    "pick_content_frame",
    "resolve_init",
    "sample_structure_strength",
    "sample_timesteps",
    "select_trainable",
    "train",
    "v_prediction_loss",
]
