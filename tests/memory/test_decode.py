"""decode_frames against plain vae.decode on tiny random VAEs of every supported family:
same pixels, same gradients for the grad frames, none for the others, and peak memory that
does not grow with the number of frames beyond the stored outputs."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastvader.memory.decode import decode_frames, to_unit_range

from tests.helpers.memtrack import LiveBytes  # noqa: E402

diffusers = pytest.importorskip("diffusers")


def _kl():
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=4)


def _svd():
    return diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        layers_per_block=1, latent_channels=4)


def _cog():
    return diffusers.AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4)


def _wan():
    return diffusers.AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0])


def _frozen(make):
    torch.manual_seed(0)
    return make().eval().requires_grad_(False)


def _grads(out, lat, weights):
    (g,) = torch.autograd.grad((out * weights).sum(), lat, allow_unused=True)
    return torch.zeros_like(lat) if g is None else g


def _check(ours, ref, lat, grad_pos):
    """Same pixels; the gradient of a weighted sum over the grad frames matches the plain
    path's; the weights on the non-grad frames contribute nothing."""
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    w = torch.rand_like(ours)
    mask = torch.zeros(ours.shape[1], dtype=torch.bool)
    mask[grad_pos] = True
    w_ref = w * mask.view(1, -1, 1, 1, 1)
    g_ours = _grads(ours, lat, w)  # weights on every frame: non-grad frames must add nothing
    g_ref = _grads(ref, lat, w_ref)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-3, atol=1e-4)
    return g_ours


def test_autoencoder_kl_matches_plain_decode():
    vae = _frozen(_kl)
    lat = torch.randn(2, 4, 5, 4, 6, requires_grad=True)
    frames, grad_frames = [3, 0, 2, 4], [0, 4, 3]
    ours = decode_frames(vae, lat, frames, grad_frames, chunk=2)
    assert ours.shape == (2, 4, 3, 8, 12)
    z = lat[:, :, frames].permute(0, 2, 1, 3, 4).reshape(-1, 4, 4, 6) / vae.config.scaling_factor
    ref = to_unit_range(vae.decode(z).sample).reshape(2, 4, 3, 8, 12)
    g = _check(ours, ref, lat, [frames.index(f) for f in grad_frames])
    assert g[:, :, [0, 3, 4]].abs().sum() > 0
    assert torch.all(g[:, :, [1, 2]] == 0)  # frame 2: decoded without gradients; frame 1: unused
    assert ours.min() >= 0 and ours.max() <= 1


def test_all_frames_default_and_no_grad_mode():
    vae = _frozen(_kl)
    lat = torch.randn(1, 4, 3, 4, 4)
    with torch.no_grad():
        out = decode_frames(vae, lat)
    z = lat[0].permute(1, 0, 2, 3) / vae.config.scaling_factor
    with torch.no_grad():
        ref = to_unit_range(vae.decode(z).sample)[None]
    torch.testing.assert_close(out, ref)
    assert not out.requires_grad


def test_temporal_decoder_matches_chunked_decode():
    vae = _frozen(_svd)
    lat = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    frames, grad_frames = [0, 1, 2, 3], [1]
    ours = decode_frames(vae, lat, frames, grad_frames, chunk=2)
    z = lat[0].permute(1, 0, 2, 3) / vae.config.scaling_factor
    ref = torch.cat([vae.decode(z[i:i + 2], num_frames=2).sample for i in (0, 2)])
    ref = to_unit_range(ref)[None]
    g = _check(ours, ref, lat, [1])
    # frame 0 shares frame 1's clip, so it receives gradient through the temporal layers;
    # the clip of frames 2-3 holds no grad frame.
    assert g[:, :, :2].abs().sum() > 0 and torch.all(g[:, :, 2:] == 0)


@pytest.mark.parametrize("mode", ["full", "truncate"])
def test_cogvideox_matches_plain_decode(mode):
    vae = _frozen(_cog)
    lat = torch.randn(1, 4, 5, 2, 2, requires_grad=True)  # batches [0:3] -> 9 frames, [3:5] -> 8
    frames, grad_frames = [12, 0, 5, 10], [12, 5]
    ours = decode_frames(vae, lat, frames, grad_frames, chunk=1, cache_backprop=mode)
    ref = to_unit_range(vae.decode(lat / vae.config.scaling_factor).sample)
    assert ref.shape[2] == 17
    ref = ref[:, :, frames].permute(0, 2, 1, 3, 4)
    if mode == "full":
        _check(ours, ref, lat, [0, 2])
        return
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-5)
    # Truncated: frame 12 (second batch) sends nothing into the first batch's latents through
    # the cache; its own batch's latents get the exact gradient.
    w = torch.zeros_like(ours)
    w[:, 0] = torch.rand_like(w[:, 0])
    g_ours = _grads(ours, lat, w)
    g_ref = _grads(ref, lat, w)
    torch.testing.assert_close(g_ours[:, :, 3:], g_ref[:, :, 3:], rtol=1e-3, atol=1e-4)
    assert torch.all(g_ours[:, :, :3] == 0) and g_ref[:, :, :3].abs().sum() > 0


@pytest.mark.parametrize("mode", ["full", "truncate"])
def test_wan_matches_plain_decode(mode):
    vae = _frozen(_wan)
    lat = torch.randn(1, 4, 3, 2, 2, requires_grad=True)  # 1 + 4 + 4 = 9 frames
    frames, grad_frames = [8, 0, 3], [8, 3]
    ours = decode_frames(vae, lat, frames, grad_frames, chunk=1, cache_backprop=mode)
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, 4, 1, 1, 1)
    ref = to_unit_range(vae.decode(lat / (1.0 / std) + mean).sample)
    assert ref.shape[2] == 9
    ref = ref[:, :, frames].permute(0, 2, 1, 3, 4)
    if mode == "full":
        _check(ours, ref, lat, [0, 2])
        return
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-5)
    w = torch.zeros_like(ours)
    w[:, 0] = torch.rand_like(w[:, 0])  # frame 8 = latent frame 2
    g_ours, g_ref = _grads(ours, lat, w), _grads(ref, lat, w)
    torch.testing.assert_close(g_ours[:, :, 2], g_ref[:, :, 2], rtol=1e-3, atol=1e-4)
    assert torch.all(g_ours[:, :, :2] == 0) and g_ref[:, :, :2].abs().sum() > 0


def _peak_bytes(fn, lat):
    track = LiveBytes()
    with track:
        out = fn(lat)
        out.sum().backward()
    return track.peak, out[0, 0].numel() * out.element_size()


def test_peak_memory_flat_in_frames_autoencoder_kl():
    """Peak bytes allocated over forward+backward grow by about one output frame (+ its
    gradient) per frame; the plain decode grows by a whole frame of activations."""
    vae = _frozen(_kl)

    def ours(lat):
        return decode_frames(vae, lat, chunk=1)

    def plain(lat):
        z = lat[0].permute(1, 0, 2, 3) / vae.config.scaling_factor
        return to_unit_range(vae.decode(z).sample)[None]

    growth = {}
    for name, fn in (("ours", ours), ("plain", plain)):
        peaks = []
        for frames in (2, 6):
            lat = torch.randn(1, 4, frames, 8, 8, requires_grad=True)
            peak, frame_bytes = _peak_bytes(fn, lat)
            peaks.append(peak)
        growth[name] = (peaks[1] - peaks[0]) / 4
    # per extra frame: output + its gradient + small latent tensors, nothing activation-sized
    assert growth["ours"] <= 2.5 * frame_bytes, growth
    assert growth["plain"] >= 10 * growth["ours"], growth


@pytest.mark.slow
def test_wan_truncated_keeps_far_less_than_plain_decode():
    """Per extra latent frame, truncated decode_frames keeps the outputs and the unit's cache
    input (parked on the CPU when running on CUDA); the plain decode keeps every activation."""
    vae = _frozen(_wan)
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, 4, 1, 1, 1)

    def plain(lat):
        return to_unit_range(vae.decode(lat * std + mean).sample).permute(0, 2, 1, 3, 4)

    def ours(lat):
        return decode_frames(vae, lat, chunk=1, cache_backprop="truncate", cache_offload=True)

    growth = {}
    for name, fn in (("ours", ours), ("plain", plain)):
        peaks = []
        for frames in (2, 4):
            torch.manual_seed(0)
            peak, _ = _peak_bytes(fn, torch.randn(1, 4, frames, 4, 4, requires_grad=True))
            peaks.append(peak)
        growth[name] = peaks[1] - peaks[0]
    assert growth["ours"] * 2 < growth["plain"], growth


def test_errors_say_what_to_change():
    vae = _frozen(_kl)
    lat = torch.randn(1, 4, 3, 4, 4)
    with pytest.raises(TypeError, match="supported VAEs"):
        decode_frames(nn.Linear(2, 2), lat)
    with pytest.raises(ValueError, match="not in frames"):
        decode_frames(vae, lat, frames=[0, 1], grad_frames=[2])
    with pytest.raises(IndexError, match="out of range"):
        decode_frames(vae, lat, frames=[3])
    with pytest.raises(ValueError, match=r"\(B, C, F, h, w\)"):
        decode_frames(vae, lat[:, :, 0])
    with pytest.raises(ValueError, match="chunk"):
        decode_frames(vae, lat, chunk=0)


@pytest.mark.slow
def test_works_on_a_group_norm_patched_vae():
    """decode_frames and fastvader.apply compose: same pixels and gradients as unpatched."""
    import fastvader

    vae = _frozen(_kl)
    lat = torch.randn(1, 4, 2, 4, 4, requires_grad=True)
    ref = decode_frames(vae, lat, chunk=1)
    g_ref = _grads(ref, lat, torch.ones_like(ref))
    fastvader.apply(vae, ops=["group_norm"])
    try:
        out = decode_frames(vae, lat, chunk=1)
        g = _grads(out, lat, torch.ones_like(out))
    finally:
        fastvader.revert(vae)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-5)
