"""Decode video latents to pixels for the reward, with gradients only where they are needed and
activation memory that does not grow with the number of frames.

``decode_frames(vae, latents, frames, grad_frames, chunk)`` decodes the frames the reward sees.
Frames outside ``grad_frames`` are decoded under ``no_grad``. Grad frames are decoded ``chunk``
decode units at a time, each unit wrapped in ``torch.utils.checkpoint`` (non-reentrant): the
forward keeps only each unit's input latents and its output pixels, and backward recomputes
one unit's activations at a time. Peak memory ~ stored outputs + one unit's activations.

What a "decode unit" is depends on the VAE family (dispatch on the class):

- ``AutoencoderKL`` (SD VAE; ModelScope, VideoCrafter, AnimateDiff): one frame; frames are
  independent, so grad and no-grad frames are decoded separately. ``chunk`` frames per unit.
- ``AutoencoderKLTemporalDecoder`` (SVD): ``chunk`` frames decoded together as one clip
  (``num_frames=chunk``), like the SVD pipeline's ``decode_chunk_size``; clips are cut from the
  selected frames in time order. A clip holding any grad frame is decoded with gradients.
- ``AutoencoderKLCogVideoX``: ``chunk`` of the VAE's own latent frame batches per unit, run in
  order with its conv cache; ``frames`` index the decoded (pixel) frames.
- ``AutoencoderKLWan``: ``chunk`` latent frames per unit, run in order through the causal
  feature cache; ``frames`` index the decoded (pixel) frames.

For the two causal VAEs the cache carries earlier frames' features into later ones. With
``cache_backprop="truncate"`` (default) the cache is detached between units: the forward is
exact, but gradients from a unit's output do not flow back into the latents of earlier units
(truncated backprop through time; exact for each unit's own latents), units before the first
grad frame run without gradients, and the cache each checkpointed unit needs for its
recompute (a couple of frames of features at every causal conv) is parked in CPU memory on
CUDA (``cache_offload``), so device memory stays flat in the frame count.
``cache_backprop="full"`` keeps the cache in the graph: exact gradients, but every unit from
the first one on runs with gradients and its cache stays on the device until backward.

Latent scaling is done here: latents are the sampler's scaled latents (B, C, F, h, w);
``/ scaling_factor`` (+ ``shift_factor``) for the KL VAEs, ``* latents_std + latents_mean`` for
Wan. Pixels come back as (B, len(frames), 3, H, W) in [0, 1] via ``(x / 2 + 0.5).clamp(0, 1)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ["decode_frames", "supported_vaes", "to_unit_range"]

CACHE_MODES = ("truncate", "full")


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """VADER's pixel convention: [-1, 1] decoder output -> [0, 1]."""
    return (x / 2 + 0.5).clamp(0, 1)


def supported_vaes() -> list[str]:
    return ["AutoencoderKL", "AutoencoderKLTemporalDecoder", "AutoencoderKLCogVideoX", "AutoencoderKLWan"]


def decode_frames(vae: nn.Module, latents: torch.Tensor, frames: Optional[Sequence[int]] = None,
                  grad_frames: Optional[Sequence[int]] = None, chunk: int = 1, *,
                  cache_backprop: str = "truncate",
                  cache_offload: Optional[bool] = None) -> torch.Tensor:
    """Decode ``frames`` of ``latents`` (B, C, F, h, w); gradients only through ``grad_frames``.

    Args:
        vae: a diffusers AutoencoderKL, AutoencoderKLTemporalDecoder, AutoencoderKLCogVideoX or
            AutoencoderKLWan.
        latents: the sampler's scaled latents, (B, C, F, h, w).
        frames: indices of the decoded frames the reward sees (None = all), in the order the
            output returns them; negative indices count from the end.
        grad_frames: the subset of ``frames`` that carries gradients (None = all of ``frames``).
        chunk: decode units per checkpointed segment (see the module doc for what a unit is).
        cache_backprop: causal-cache VAEs only: "truncate" (approximate gradients across
            units; the cache each unit needs for its recompute can leave the GPU) or "full"
            (exact; every unit's cache stays on the device until backward).
        cache_offload: truncate mode: keep the per-unit cache inputs in CPU memory between
            forward and backward (None = when the latents are on CUDA).

    Returns:
        (B, len(frames), 3, H, W) pixels in [0, 1].
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be (B, C, F, h, w), got shape {tuple(latents.shape)}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if cache_backprop not in CACHE_MODES:
        raise ValueError(f"cache_backprop must be one of {CACHE_MODES}, got {cache_backprop!r}")
    family = _family(vae)
    if cache_offload is None:
        cache_offload = latents.device.type == "cuda"
    opts = _Options(cache_backprop, bool(cache_offload) and cache_backprop == "truncate")
    return family(vae, latents, frames, grad_frames, int(chunk), opts)


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
def _family(vae: nn.Module) -> Callable:
    # Match on class names through the MRO so that subclasses work and diffusers is imported
    # only when a VAE is passed.
    names = [cls.__name__ for cls in type(vae).__mro__]
    for name, fn in (("AutoencoderKLTemporalDecoder", _decode_temporal),
                     ("AutoencoderKLCogVideoX", _decode_cogvideox),
                     ("AutoencoderKLWan", _decode_wan),
                     ("AutoencoderKL", _decode_per_frame)):
        if name in names:
            return fn
    raise TypeError(
        f"decode_frames does not support {type(vae).__name__}; supported VAEs: "
        f"{', '.join(supported_vaes())}. Decode with vae.decode yourself, or add a family in "
        "fastvader/memory/decode.py")


@dataclass
class _Options:
    cache_backprop: str
    cache_offload: bool


@dataclass
class _Selection:
    frames: list[int]        # output order
    grad: set[int]           # subset of frames carrying gradients


def _select(frames, grad_frames, total: int) -> _Selection:
    def norm(idx, what):
        out = []
        for i in idx:
            i = int(i)
            j = i + total if i < 0 else i
            if not 0 <= j < total:
                raise IndexError(f"{what} index {i} is out of range for {total} decoded frames")
            out.append(j)
        return out

    sel = list(range(total)) if frames is None else norm(frames, "frames")
    if not sel:
        raise ValueError("frames is empty: pass None for all frames or at least one index")
    if len(set(sel)) != len(sel):
        raise ValueError(f"frames has duplicates: {list(frames)}")
    grad = set(sel) if grad_frames is None else set(norm(grad_frames, "grad_frames"))
    if not grad <= set(sel):
        raise ValueError(f"grad_frames {sorted(grad - set(sel))} are not in frames {sel}")
    if not torch.is_grad_enabled():
        grad = set()
    return _Selection(sel, grad)


def _scaled_kl(vae, latents: torch.Tensor) -> torch.Tensor:
    """Undo the sampler's latent scaling for the KL-family VAEs."""
    cfg = vae.config
    z = latents / cfg.scaling_factor
    shift = getattr(cfg, "shift_factor", None)
    if shift is not None:
        z = z + shift
    return z


def _vae_dtype(vae: nn.Module, latents: torch.Tensor) -> torch.dtype:
    p = next(vae.parameters(), None)
    return p.dtype if p is not None else latents.dtype


def _run(fn: Callable, *args, with_grad: bool):
    """fn(*args) checkpointed (only its inputs and outputs kept) when gradients are wanted,
    else under no_grad."""
    if with_grad:
        return checkpoint(fn, *args, use_reentrant=False)
    with torch.no_grad():
        return fn(*args)


def _assemble(per_frame: dict[int, torch.Tensor], sel: _Selection) -> torch.Tensor:
    return torch.stack([per_frame[f] for f in sel.frames], dim=1)


def _chunks(seq: list[int], size: int) -> list[list[int]]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


# --------------------------------------------------------------------------------------------
# AutoencoderKL: frames are independent
# --------------------------------------------------------------------------------------------
def _decode_per_frame(vae, latents, frames, grad_frames, chunk, opts):
    B, C, F, h, w = latents.shape
    sel = _select(frames, grad_frames, F)
    z = _scaled_kl(vae, latents).to(_vae_dtype(vae, latents))

    def decode(zc: torch.Tensor) -> torch.Tensor:
        return to_unit_range(vae.decode(zc).sample)

    per_frame: dict[int, torch.Tensor] = {}
    ordered = sorted(sel.frames)
    for with_grad, group in ((True, [f for f in ordered if f in sel.grad]),
                             (False, [f for f in ordered if f not in sel.grad])):
        for idx in _chunks(group, chunk):
            zc = z[:, :, idx].permute(0, 2, 1, 3, 4).reshape(B * len(idx), C, h, w)
            out = _run(decode, zc, with_grad=with_grad)
            out = out.reshape(B, len(idx), *out.shape[1:])
            for j, f in enumerate(idx):
                per_frame[f] = out[:, j]
    return _assemble(per_frame, sel)


# --------------------------------------------------------------------------------------------
# AutoencoderKLTemporalDecoder (SVD): clips of `chunk` frames
# --------------------------------------------------------------------------------------------
def _decode_temporal(vae, latents, frames, grad_frames, chunk, opts):
    B, C, F, h, w = latents.shape
    sel = _select(frames, grad_frames, F)
    z = _scaled_kl(vae, latents).to(_vae_dtype(vae, latents))

    def decode(zc: torch.Tensor, k: int) -> torch.Tensor:
        return to_unit_range(vae.decode(zc, num_frames=k).sample)

    per_frame: dict[int, torch.Tensor] = {}
    for idx in _chunks(sorted(sel.frames), chunk):
        with_grad = any(f in sel.grad for f in idx)
        zc = z[:, :, idx].permute(0, 2, 1, 3, 4).reshape(B * len(idx), C, h, w)
        out = _run(decode, zc, len(idx), with_grad=with_grad)
        out = out.reshape(B, len(idx), *out.shape[1:])
        for j, f in enumerate(idx):
            per_frame[f] = out[:, j] if f in sel.grad else out[:, j].detach()
    return _assemble(per_frame, sel)


# --------------------------------------------------------------------------------------------
# causal-cache VAEs: units run in order; the cache links them
# --------------------------------------------------------------------------------------------
def _move_tree(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _move_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move_tree(v, device) for v in obj)
    return obj


def _detach_tree(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detach_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach_tree(v) for v in obj)
    return obj


def _decode_causal(units: list[tuple[int, int]], out_counts: list[int], run_unit: Callable,
                   sel: _Selection, chunk: int, opts: _Options, cache0):
    """Shared driver: ``units`` are latent ranges, ``out_counts`` the decoded frames each unit
    yields, ``run_unit(first_unit, last_unit, cache) -> (pixels (B,3,T,H,W), cache)``."""
    starts = [0]
    for n in out_counts:
        starts.append(starts[-1] + n)
    last_needed = max(sel.frames)
    per_frame: dict[int, torch.Tensor] = {}
    cache = cache0
    n_units = len(units)
    u = 0
    while u < n_units and starts[u] <= last_needed:  # later units cannot affect these frames
        v = min(u + chunk, n_units)
        lo, hi = starts[u], starts[v]
        wanted = [f for f in sel.frames if lo <= f < hi]
        if opts.cache_backprop == "full":  # later grad frames reach back through the cache
            with_grad = any(f >= lo for f in sel.grad)
        else:
            with_grad = any(f in sel.grad for f in wanted)
        if with_grad and opts.cache_backprop == "truncate":
            # The checkpoint keeps its inputs for the recompute: detached, and optionally in
            # CPU memory, the cache is all a unit leaves behind besides its output.
            cache = _detach_tree(cache)
            if opts.cache_offload:
                cache = _move_tree(cache, "cpu")
        out, cache = _run(run_unit, u, v, cache, with_grad=with_grad)
        if out.shape[2] != hi - lo:
            raise RuntimeError(f"decoded {out.shape[2]} frames for latent units {u}..{v - 1}, "
                               f"expected {hi - lo}; this VAE's frame layout is not the one "
                               "decode_frames assumes")
        for f in wanted:
            frame = out[:, :, f - lo]
            per_frame[f] = frame if f in sel.grad else frame.detach()
        u = v
    return _assemble(per_frame, sel)


def _decode_cogvideox(vae, latents, frames, grad_frames, chunk, opts):
    from diffusers.models.upsampling import CogVideoXUpsample3D

    if getattr(vae, "use_tiling", False):
        raise ValueError("decode_frames does not support CogVideoX tiling: call vae.disable_tiling()")
    z = _scaled_kl(vae, latents).to(_vae_dtype(vae, latents))
    F = z.shape[2]
    # The VAE's own batching (AutoencoderKLCogVideoX._decode): the remainder joins batch 0.
    fbs = vae.num_latent_frames_batch_size
    n_batches = max(F // fbs, 1)
    rem = F % fbs
    units = []
    for i in range(n_batches):
        start = fbs * i + (0 if i == 0 else rem)
        units.append((start, min(fbs * (i + 1) + rem, F)))
    time_ups = sum(1 for m in vae.decoder.modules()
                   if isinstance(m, CogVideoXUpsample3D) and m.compress_time)

    def frames_out(n: int) -> int:
        for _ in range(time_ups):  # CogVideoXUpsample3D: odd counts keep their first frame
            n = 2 * n - 1 if (n > 1 and n % 2 == 1) else (2 * n if n > 1 else 1)
        return n

    out_counts = [frames_out(b - a) for a, b in units]
    sel = _select(frames, grad_frames, sum(out_counts))

    def run_unit(u0: int, u1: int, cache):
        cache = _move_tree(cache, z.device)
        outs = []
        for a, b in units[u0:u1]:
            zi = z[:, :, a:b]
            if vae.post_quant_conv is not None:
                zi = vae.post_quant_conv(zi)
            out, cache = vae.decoder(zi, conv_cache=cache)
            outs.append(out)
        return to_unit_range(torch.cat(outs, dim=2)), cache

    return _decode_causal(units, out_counts, run_unit, sel, chunk, opts, None)


def _decode_wan(vae, latents, frames, grad_frames, chunk, opts):
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    if getattr(vae, "use_tiling", False):
        raise ValueError("decode_frames does not support Wan tiling: call vae.disable_tiling()")
    cfg = vae.config
    dtype = _vae_dtype(vae, latents)
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
    std = torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
    z = (latents * std + mean).to(dtype)  # = latents / (1 / std) + mean, as WanPipeline does
    F = z.shape[2]
    t_ratio = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
    units = [(i, i + 1) for i in range(F)]
    out_counts = [1] + [t_ratio] * (F - 1)  # the first latent frame decodes to one frame
    sel = _select(frames, grad_frames, sum(out_counts))
    # one cache slot per causal conv of the decoder (what AutoencoderKLWan.clear_cache sizes)
    n_cached = sum(isinstance(m, wan.WanCausalConv3d) for m in vae.decoder.modules())

    def run_unit(u0: int, u1: int, cache):
        # The decoder writes into the list; the caller's list (kept by the checkpoint for the
        # recompute) must stay as it was.
        cache = list(_move_tree(cache, z.device))
        x = vae.post_quant_conv(z[:, :, u0:u1])  # kernel 1 in time: per frame, no cache
        outs = []
        for i in range(u1 - u0):
            outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0],
                                    first_chunk=(u0 + i == 0)))
        out = torch.cat(outs, dim=2)
        if cfg.patch_size is not None:
            out = wan.unpatchify(out, patch_size=cfg.patch_size)
        return to_unit_range(out), cache

    return _decode_causal(units, out_counts, run_unit, sel, chunk, opts,
                          [None] * n_cached)
