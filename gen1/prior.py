"""The prior: CLIP text embedding -> CLIP image embedding (DALL-E 2 style, as Karlo/unCLIP).

A diffusers ``PriorTransformer`` predicts the clean (normalised) image embedding from a noised one, given
the projected text embedding, the text token states and the text mask; an ``UnCLIPScheduler`` (Karlo's,
`gen1.schedule.karlo_scheduler`: ``prediction_type="sample"``, ``fixed_small_log``, clip range 5) runs the
reverse process; the model's
own ``clip_mean`` / ``clip_std`` map the result back to CLIP space. Gen-1 uses it to turn a text prompt
into the image embedding its UNet is conditioned on.

On disk a prior is the ``PriorTransformer``'s own ``save_pretrained`` directory plus the scheduler config
in ``scheduler/``; Karlo's layout (``prior/`` next to ``prior_scheduler/``) loads too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import PriorTransformer, UnCLIPScheduler
from diffusers.utils.torch_utils import randn_tensor

from gen1.schedule import PRIOR_SCHEDULER_SUBFOLDER, karlo_scheduler, load_prior_scheduler
from gen1.weights import load_prior, resolve_spec

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 4.0  # Karlo's prior classifier-free guidance scale


class Prior:
    """Sample CLIP image embeddings from CLIP text embeddings; the training loss of the same model.

    Text inputs (one row per prompt), as Karlo takes them from OpenAI CLIP ViT-L/14:
    ``text_pooled`` (n, d) the projected text embedding (not normalised), ``text_tokens`` (n, 77, d) the
    last hidden states after the final LayerNorm, ``text_mask`` (n, 77) bool, True for real tokens (SOT..EOT).

    A freshly initialised ``PriorTransformer`` has ``clip_std == 0``; then the normalisation is set to the
    identity (mean 0, std 1) so sampling and the loss are defined. ``set_clip_stats`` sets real statistics.
    """

    def __init__(self, prior: PriorTransformer, scheduler: UnCLIPScheduler | None = None):
        self.prior = prior
        self.scheduler = scheduler if scheduler is not None else karlo_scheduler()
        if not torch.is_tensor(prior.clip_std) or prior.clip_std.is_meta:
            return
        if torch.all(prior.clip_std == 0):
            log.warning("prior has clip_std == 0 (freshly initialised): using identity normalisation")
            self.set_clip_stats(torch.zeros(prior.clip_mean.shape[-1]), torch.ones(prior.clip_std.shape[-1]))

    # ---- properties -------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Width of the CLIP image embedding it produces."""
        return int(self.prior.clip_mean.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.prior.clip_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.clip_mean.dtype

    def to(self, device=None, dtype=None) -> Prior:
        self.prior.to(device=device, dtype=dtype)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """All parameters except the fixed CLIP statistics ``clip_mean`` / ``clip_std``."""
        return [p for n, p in self.prior.named_parameters() if n not in ("clip_mean", "clip_std")]

    @torch.no_grad()
    def set_clip_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the per-dimension mean/std that normalise image embeddings. mean, std: (d,)."""
        if mean.shape[-1] != self.dim or std.shape[-1] != self.dim:
            raise ValueError(
                f"clip stats must have width {self.dim}, found {mean.shape[-1]} and {std.shape[-1]}"
            )
        if torch.any(std <= 0):
            raise ValueError("clip_std must be positive everywhere")
        self.prior.clip_mean.copy_(mean.reshape(1, -1))
        self.prior.clip_std.copy_(std.reshape(1, -1))

    def fit_clip_stats(self, image_embeds: torch.Tensor, eps: float = 1e-6) -> None:
        """Set the normalisation from a sample of image embeddings (n, d), as Karlo's ViT-L-14_stats."""
        self.set_clip_stats(image_embeds.float().mean(0), image_embeds.float().std(0).clamp_min(eps))

    def typical_norm(self) -> float:
        """The root-mean-square L2 norm of the image embeddings the prior's statistics describe:
        ``sqrt(sum(clip_mean**2 + clip_std**2))`` (E|x|^2 = |mean|^2 + sum(var)). For a prior fitted on raw
        embeddings it is their typical norm; on unit-norm ones about 1."""
        mean, std = self.prior.clip_mean.detach().float(), self.prior.clip_std.detach().float()
        return float((mean.square() + std.square()).sum().sqrt())

    def normalise(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (n, d) -> the prior's diffusion space (n, d)."""
        mean, std = self.prior.clip_mean.detach(), self.prior.clip_std.detach()
        return (image_embeds.to(mean) - mean) / std

    # ---- checks ------------------------------------------------------------------------------------------
    def _check_text(
        self, text_pooled: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
    ) -> None:
        cfg = self.prior.config
        n = text_pooled.shape[0]
        width = cfg.embedding_proj_dim or cfg.embedding_dim
        if text_pooled.ndim != 2 or text_pooled.shape[1] != width:
            raise ValueError(f"text_pooled must be (n, {width}), found {tuple(text_pooled.shape)}")
        if text_tokens.shape != (n, cfg.num_embeddings, cfg.embedding_dim):
            raise ValueError(
                f"text_tokens must be ({n}, {cfg.num_embeddings}, {cfg.embedding_dim}) for this prior, "
                f"found {tuple(text_tokens.shape)}"
            )
        if text_mask.shape != (n, cfg.num_embeddings):
            raise ValueError(f"text_mask must be ({n}, {cfg.num_embeddings}), found {tuple(text_mask.shape)}")

    def _predict(self, x: torch.Tensor, t, text_pooled, text_tokens, text_mask, model=None) -> torch.Tensor:
        dtype = self.prior.dtype
        out = (model if model is not None else self.prior)(
            x.to(dtype),
            timestep=t,
            proj_embedding=text_pooled.to(self.device, dtype),
            encoder_hidden_states=text_tokens.to(self.device, dtype),
            attention_mask=text_mask.to(self.device).bool(),
        ).predicted_image_embedding
        return out.float()

    # ---- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        text_pooled: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        steps: int = 25,
        guidance_scale: float = 1.0,
        uncond: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Text embeddings -> CLIP image embeddings (n, d) float32 (not L2-normalised), as unCLIP's prior loop.

        ``guidance_scale > 1`` needs ``uncond`` = (pooled, tokens, mask) of the empty prompt (1 or n rows).
        """
        self._check_text(text_pooled, text_tokens, text_mask)
        n = text_pooled.shape[0]
        guided = guidance_scale > 1.0
        if guided:
            if uncond is None:
                raise ValueError(f"guidance_scale={guidance_scale} needs uncond=(pooled, tokens, mask) of ''")
            u_pooled, u_tokens, u_mask = (u.expand(n, *u.shape[1:]) for u in uncond)
            self._check_text(u_pooled, u_tokens, u_mask)
            text_pooled = torch.cat([u_pooled.to(text_pooled), text_pooled])
            text_tokens = torch.cat([u_tokens.to(text_tokens), text_tokens])
            text_mask = torch.cat([u_mask.to(text_mask), text_mask])
        scheduler = UnCLIPScheduler.from_config(self.scheduler.config)  # fresh state: set_timesteps mutates
        scheduler.set_timesteps(steps)  # on CPU: the scheduler indexes its CPU tables with them
        timesteps = scheduler.timesteps
        x = randn_tensor((n, self.dim), generator=generator, device=self.device, dtype=torch.float32)
        x = x * scheduler.init_noise_sigma
        for i, t in enumerate(timesteps):
            model_in = torch.cat([x, x]) if guided else x
            pred = self._predict(model_in, t, text_pooled, text_tokens, text_mask)
            if guided:
                p_uncond, p_text = pred.chunk(2)
                pred = p_uncond + guidance_scale * (p_text - p_uncond)
            prev_t = None if i + 1 == len(timesteps) else timesteps[i + 1]
            x = scheduler.step(
                pred, timestep=t, sample=x, prev_timestep=prev_t, generator=generator
            ).prev_sample
        return self.prior.post_process_latents(x.to(self.dtype)).float()

    # ---- training ------------------------------------------------------------------------------------------
    def loss(
        self,
        text_pooled: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """MSE between the prediction and its target at random timesteps (Karlo: the clean, normalised
        image embedding). image_embeds: (n, d) CLIP image embeddings. Returns a float32 scalar.

        Classifier-free guidance training is the caller's: replace some rows' text by the empty prompt's.
        ``model``: a wrapper of ``self.prior`` to call instead (e.g. DistributedDataParallel, so gradients sync).
        """
        self._check_text(text_pooled, text_tokens, text_mask)
        n = image_embeds.shape[0]
        if image_embeds.shape != (n, self.dim) or n != text_pooled.shape[0]:
            raise ValueError(
                f"image_embeds must be ({text_pooled.shape[0]}, {self.dim}), found {tuple(image_embeds.shape)}"
            )
        x0 = self.normalise(image_embeds).float()
        T = self.scheduler.config.num_train_timesteps
        if timesteps is None:
            timesteps = torch.randint(0, T, (n,), generator=generator, device="cpu")
        timesteps = timesteps.to(self.device).long()
        noise = randn_tensor(x0.shape, generator=generator, device=self.device, dtype=torch.float32)
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        pred = self._predict(x_t, timesteps, text_pooled, text_tokens, text_mask, model=model)
        kind = self.scheduler.config.prediction_type
        if kind == "sample":
            target = x0
        elif kind == "epsilon":
            target = noise
        else:
            raise ValueError(f"prediction_type must be 'sample' or 'epsilon', found {kind!r}")
        return F.mse_loss(pred, target)

    # ---- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """The PriorTransformer's own save in ``path``, the scheduler config in ``path/scheduler``."""
        path = Path(path)
        self.prior.save_pretrained(path)
        self.scheduler.save_pretrained(path / PRIOR_SCHEDULER_SUBFOLDER)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Prior:
        path = Path(path)
        prior = PriorTransformer.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        return cls(prior.to(device).eval(), load_prior_scheduler(path))

    @classmethod
    def load(cls, spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Prior:
        """A prior from a weight spec (``hf:kakaobrain/karlo-v1-alpha/prior``, a directory, ``tiny:prior``)."""
        path = resolve_spec(spec, component="prior")
        prior = load_prior(spec, device=device, dtype=dtype).eval()
        return cls(prior, load_prior_scheduler(path))

