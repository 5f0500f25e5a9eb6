"""Per-video edit metrics of the paper (Sec. 4) and Fig. 4, as pure functions.

- frame consistency: mean cosine similarity of the CLIP image embeddings of consecutive output frames
  (the paper's); `frame_consistency_all_pairs` averages over every pair of frames instead (TGVE's);
- prompt consistency: mean cosine similarity between the edit prompt's CLIP text embedding and each
  output frame's CLIP image embedding;
- flow-warp error: MSE between frame t and frame t+1 warped back to t along the optical flow
  (OpenCV Farneback), on [0, 1] intensities; lower means temporally smoother (Fig. 4);
- depth fidelity: Pearson correlation between the input's depth and the output's depth;
- metrics that need no pretrained model (the miniature reproduction, `jobs.benchmarks.mini_repro`):
  `frame_mse` (consecutive frames, unwarped), `gradient_correlation` (structure kept: input vs output image
  gradients), `colour_histogram` and `histogram_distance` (content: an output's colours vs a reference
  image's), `psnr` (VAE reconstructions);
- `video_metrics`: all of them for one output video (the edit manifest's and the eval table's columns).

Embeddings need not be normalised: cosines normalise them. Inputs may be numpy arrays or torch tensors.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch

log = logging.getLogger(__name__)

# OpenCV Farneback parameters (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags):
# OpenCV's documented defaults for dense flow on natural video.
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)


def _float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return (
        x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    )


def _as_matrix(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    a = _float64(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be (f, d), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite values")
    return a


def _unit_rows(a: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has a zero-norm row: cosine similarity is undefined")
    return a / norms


def frame_consistency(emb: np.ndarray | torch.Tensor) -> float:
    """Mean cosine similarity of consecutive frames' embeddings. emb: (f, d), f >= 2 -> float in [-1, 1]."""
    e = _unit_rows(_as_matrix(emb, "emb"), "emb")
    if len(e) < 2:
        raise ValueError(f"frame consistency needs at least 2 frames, got {len(e)}")
    return float(np.mean(np.sum(e[1:] * e[:-1], axis=-1)))


def frame_consistency_all_pairs(emb: np.ndarray | torch.Tensor) -> float:
    """Mean cosine similarity over all pairs i < j of frames. emb: (f, d), f >= 2 -> float in [-1, 1]."""
    e = _unit_rows(_as_matrix(emb, "emb"), "emb")
    f = len(e)
    if f < 2:
        raise ValueError(f"frame consistency needs at least 2 frames, got {f}")
    sims = e @ e.T
    return float(sims[np.triu_indices(f, k=1)].mean())


def prompt_consistency(frame_emb: np.ndarray | torch.Tensor, text_emb: np.ndarray | torch.Tensor) -> float:
    """Mean cosine similarity of each frame's image embedding with the prompt's text embedding.

    frame_emb: (f, d); text_emb: (d,) (or (1, d)) -> float in [-1, 1].
    """
    frames = _unit_rows(_as_matrix(frame_emb, "frame_emb"), "frame_emb")
    text = _as_matrix(_float64(text_emb).reshape(1, -1), "text_emb")
    if text.shape[1] != frames.shape[1]:
        raise ValueError(
            f"text_emb has width {text.shape[1]}, frame_emb has width {frames.shape[1]}: expected equal"
        )
    text = _unit_rows(text, "text_emb")[0]
    return float(np.mean(frames @ text))


def _check_video(frames: np.ndarray, name: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 (f, h, w, 3), got {frames.dtype} {frames.shape}")
    if len(frames) < 2:
        raise ValueError(f"{name} needs at least 2 frames, got {len(frames)}")
    return frames


def warp_back(next_frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample ``next_frame`` (h, w[, c]) at ``p + flow[p]``: frame t+1 warped onto frame t.

    flow: float32 (h, w, 2), the (dx, dy) displacement from frame t to frame t+1 at every pixel of t.
    Pixels whose flow leaves the image take the nearest border value.
    """
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(
        next_frame,
        grid_x + flow[..., 0],
        grid_y + flow[..., 1],
        interpolation=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


def flow_warp_error(frames: np.ndarray) -> float:
    """Mean over t of MSE(frame t, frame t+1 warped back to t by Farneback flow t -> t+1).

    frames: uint8 (f, h, w, 3), f >= 2 -> float >= 0 on [0, 1] intensities (0 for a static clip).
    """
    frames = _check_video(frames, "frames")
    rgb = frames.astype(np.float32) / 255.0
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    errors = []
    for t in range(len(frames) - 1):
        flow = cv2.calcOpticalFlowFarneback(grey[t], grey[t + 1], None, *FARNEBACK)
        warped = warp_back(rgb[t + 1], flow)
        errors.append(float(np.mean((warped - rgb[t]) ** 2)))
    return float(np.mean(errors))


def depth_fidelity(depth_in: np.ndarray | torch.Tensor, depth_out: np.ndarray | torch.Tensor) -> float:
    """Pearson correlation over all pixels of the input's and the output's depth.

    depth_in, depth_out: (f, h, w) of equal shape -> float in [-1, 1]; NaN when either is constant
    (the correlation is undefined there, as in ``np.corrcoef``).
    """
    a, b = _float64(depth_in), _float64(depth_out)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"depth_in and depth_out must both be (f, h, w), got {a.shape} and {b.shape}")
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
    if denom == 0:
        log.warning("depth fidelity undefined: a depth map is constant over the clip")
        return float("nan")
    return float(np.sum(a * b) / denom)


def frame_mse(frames: np.ndarray) -> float:
    """Mean over t of MSE(frame t, frame t+1), unwarped, on [0, 1] intensities.

    frames: uint8 (f, h, w, 3), f >= 2 -> float >= 0 (0 for a static clip).
    """
    rgb = _check_video(frames, "frames").astype(np.float64) / 255.0
    return float(np.mean((rgb[1:] - rgb[:-1]) ** 2))


def _pearson(a: np.ndarray, b: np.ndarray, what: str) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
    if denom == 0:
        log.warning("%s undefined: one side is constant", what)
        return float("nan")
    return float(np.sum(a * b) / denom)


def gradient_magnitude(frames: np.ndarray) -> np.ndarray:
    """|grad| of each frame's grey level (central differences, `np.gradient`), [0, 1] intensities.

    frames: uint8 (f, h, w, 3) -> float64 (f, h, w).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (f, h, w, 3), got {frames.dtype} {frames.shape}")
    grey = frames.astype(np.float64).mean(axis=-1) / 255.0
    gy, gx = np.gradient(grey, axis=(1, 2))
    return np.sqrt(gx * gx + gy * gy)


def gradient_correlation(frames_in: np.ndarray, frames_out: np.ndarray) -> float:
    """Pearson correlation over all pixels of the input's and the output's gradient magnitudes: how much of
    the input's edges the output keeps.

    frames_in, frames_out: uint8 (f, h, w, 3) of equal shape -> float in [-1, 1]; NaN when either is flat.
    """
    if np.shape(frames_in) != np.shape(frames_out):
        raise ValueError(f"frames_in and frames_out must have equal shapes, got {np.shape(frames_in)} and "
                         f"{np.shape(frames_out)}")
    return _pearson(gradient_magnitude(frames_in), gradient_magnitude(frames_out), "gradient correlation")


def colour_histogram(pixels: np.ndarray, bins: int = 8) -> np.ndarray:
    """The normalised joint RGB histogram of every pixel of ``pixels``, ``bins`` per channel.

    pixels: uint8 (..., 3), e.g. an image (h, w, 3) or a video (f, h, w, 3) -> float64 (bins, bins, bins),
    summing to 1.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.shape[-1] != 3 or pixels.size == 0:
        raise ValueError(f"pixels must be non-empty uint8 (..., 3), got {pixels.dtype} {pixels.shape}")
    idx = (pixels.reshape(-1, 3).astype(np.int64) * bins) // 256
    flat = (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2]
    counts = np.bincount(flat, minlength=bins**3).astype(np.float64)
    return (counts / counts.sum()).reshape(bins, bins, bins)


def histogram_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance of two normalised histograms: ``0.5 * sum |p - q|``.

    p, q: float (bins, bins, bins) of equal shape, each summing to 1 -> float in [0, 1] (0: equal,
    1: disjoint).
    """
    p, q = _float64(p), _float64(q)
    if p.shape != q.shape:
        raise ValueError(f"histograms must have equal shapes, got {p.shape} and {q.shape}")
    return float(0.5 * np.abs(p - q).sum())


def psnr(reference: np.ndarray | torch.Tensor, test: np.ndarray | torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(peak^2 / MSE)`` over all elements.

    reference, test: equal shapes, e.g. (n, 3, h, w) in [0, 1] -> float (inf when equal).
    """
    a, b = _float64(reference), _float64(test)
    if a.shape != b.shape:
        raise ValueError(f"reference and test must have equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak * peak / mse))


def video_metrics(
    frames: np.ndarray,
    frame_emb: np.ndarray | torch.Tensor,
    target_emb: np.ndarray | torch.Tensor,
    depth_in: np.ndarray | torch.Tensor,
    depth_out: np.ndarray | torch.Tensor,
) -> dict[str, float | None]:
    """Every per-video metric of one output, as the edit manifest and the eval table store them.

    frames: uint8 (f, h, w, 3) output; frame_emb: (f, d) its CLIP image embeddings; target_emb: (d,) the
    prompt's CLIP text embedding (or the reference image's); depth_in, depth_out: (f, h, w) depth of input
    and output. The metrics of consecutive frames are None for a one-frame output.
    """
    many = len(frames) >= 2
    return {
        "frame_consistency": frame_consistency(frame_emb) if many else None,
        "frame_consistency_all_pairs": frame_consistency_all_pairs(frame_emb) if many else None,
        "prompt_consistency": prompt_consistency(frame_emb, target_emb),
        "flow_warp_error": flow_warp_error(frames) if many else None,
        "depth_fidelity": depth_fidelity(depth_in, depth_out),
    }
