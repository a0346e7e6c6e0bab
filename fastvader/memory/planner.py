"""Predict a training step's peak GPU memory and pick the fastest settings that fit a budget.

Measurements come from the real modules built on the meta device (no weights allocated, a
few seconds even for ModelScope 1.7B): the activations one gradient-carrying denoiser call
keeps under each checkpointing policy (``saved_bytes``), the largest unit a policy recomputes
in backward, the working set of a no-grad call, what ``decode_frames`` keeps per frame and its
recompute peak, and what the reward keeps per frame. They are cached per geometry (see
``cache_path``). The peak is then composed analytically:

    static  = denoiser weights + LoRA (fp32) + its gradients + optimizer state
              + frozen models (VAE, reward) when resident
    kept(K) = K x (activations one grad step keeps under the policy + the scheduler's latents)
              (offloaded: only tensors too small to move stay on the GPU)
    peak    = static + max(sampling working set,
                          kept(K-1) + one grad call's forward peak,
                          kept(K) + decode kept + max(reward kept, decode recompute) + frozen on demand,
                          kept(K) + denoiser recompute + frozen on demand)

(backward frees each part's saved tensors as it goes: reward, then decode, then denoiser).

Relative speed counts denoiser forward passes: a no-grad step is 1, a grad step is 3 (forward
+ backward) plus 1 per recomputation level (block / sub-block: 1, per-step nested: 2), with
small fixed costs for offload copies and on-demand moves. It ranks settings; it is not a clock.

Frozen weights (fp8 storage, block swap; :func:`frozen_weight_parts`): fp8 layers store one byte
a weight plus an fp32 scale per output channel. Block swap takes the last N transformer blocks'
weights off the GPU (into pinned host memory), adds the two blocks in flight (the one running
and the one prefetched) to every phase that runs the denoiser, and, without checkpointing,
the swapped blocks' copies autograd keeps per grad step. Its time: each swapped block's copy
overlaps the block before it, so what shows per denoiser pass is the copy time beyond that
block's compute, from assumed rates (:data:`HOST_TO_GPU_BYTES_PER_S`, :data:`GPU_FLOPS`) and the
FLOPs of one call counted on the meta device; the GPU suite measures the real overlap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from torch.utils.flop_counter import FlopCounterMode

from fastvader.config import TrainConfig, parse_bytes, parse_frame_spec, parse_truncation
from fastvader.memory.accounting import gpu_like_attention, record_saved
from fastvader.memory.block_swap import transformer_blocks

GiB = 2 ** 30
POLICIES = ("none", "block", "sub_block", "step")
#: denoiser forward passes per grad step (forward + backward ~ 3, plus recomputation)
GRAD_STEP_COST = {"none": 3.0, "block": 4.0, "sub_block": 4.0, "step": 5.0}
OFFLOAD_COST_PER_GRAD_STEP = 0.5  # host copies out and back, mostly overlapped
ON_DEMAND_COST = 0.3  # moving the VAE and reward on and off the GPU once per step
#: what the allocator needs beyond the tensors (fragmentation, cuBLAS workspaces)
HEADROOM = 0.92
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: the timestep of the measured denoiser calls: memory does not depend on it
_TIMESTEP = 500
#: assumed rates for the time block swap and fp8 add (a 24 GB consumer card on PCIe 4.0 x16):
#: pinned host-to-GPU copies, sustained bf16 matmul throughput, GPU memory bandwidth
HOST_TO_GPU_BYTES_PER_S = 20e9
GPU_FLOPS = 100e12
GPU_BYTES_PER_S = 0.9e12
#: denoiser passes through the blocks per grad step beyond its forward (recomputation levels)
RECOMPUTE_PASSES = {"none": 0, "block": 1, "sub_block": 1, "step": 2}


# ---------------------------------------------------------------------------------------------
# measuring on the meta device
# ---------------------------------------------------------------------------------------------
class LivePeak(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the storages created inside the block that are alive at once. A storage
    counts once and stays alive while any tensor made inside the block holds it: saved tensors
    (a grad forward's peak includes them) and aliases such as the ``detach()`` copies in which
    non-reentrant checkpointing keeps what it recomputes during backward."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._holders: dict[int, int] = {}  # storage key -> tensors of the block holding it
        self._nbytes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
            self.live -= self._nbytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = torch.utils._pytree.tree_leaves
        inputs = {t.untyped_storage()._cdata for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key not in self._holders:
                if key in inputs:
                    continue  # a view or in-place result of a storage made before the block
                self._holders[key] = 0
                self._nbytes[key] = t.untyped_storage().nbytes()
                self.live += self._nbytes[key]
            self._holders[key] += 1
            weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


@dataclass
class Measurements:
    """Bytes measured for one geometry (all activations at the activation dtype)."""

    call_kept: dict[str, int]          # kept by one grad CFG call, per policy
    call_forward_peak: dict[str, int]  # peak while that call runs forward, per policy
    unit_peak: dict[str, int]          # largest unit a policy recomputes (block, sub_block)
    nograd_working: int                # working set of one no-grad CFG call
    latent_bytes: int                  # one latent batch (B, C, F, h, w)
    decode_kept_first: int             # decode_frames with one grad frame
    decode_kept_per_frame: int         # each further grad frame
    decode_recompute: int              # peak of backward through one decode unit (it recomputes)
    reward_kept_per_frame: int
    reward_fixed: int
    scheduler_fixed: int               # the scheduler's tables: grad steps index into them
    params: dict[str, int]             # parameter counts: denoiser, lora, vae, reward, text_encoder
    lora_tensor_sizes: list[int] = field(default_factory=list)
    blocks: list[list[int]] = field(default_factory=list)  # per transformer block: frozen [other, fp8, scales] counts
    unit_count: dict[str, int] = field(default_factory=dict)  # units a policy checkpoints (block, sub_block)
    call_flops: int = 0                # one no-grad CFG denoiser call

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def activation_dtype(cfg: TrainConfig, device_type: str = "cuda") -> torch.dtype:
    """What activations are stored in on the target: the autocast dtype when it is half, else
    the weights' dtype."""
    from fastvader.precision import DTYPES

    amp = cfg.train.precision
    if amp == "auto":
        amp = "bf16" if device_type == "cuda" else "fp32"
    if amp in ("bf16", "fp16"):
        return DTYPES[amp]
    return DTYPES[weight_dtype_name(cfg, device_type)]


def weight_dtype_name(cfg: TrainConfig, device_type: str = "cuda") -> str:
    spec = cfg.backbone.dtype
    if spec == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return spec


def _geometry_key(cfg: TrainConfig, dtype: torch.dtype) -> dict:
    from fastvader.memory.decode import decode_frames

    return {"backbone": dataclasses.asdict(cfg.backbone), "video": [cfg.video.frames, cfg.video.height, cfg.video.width],
            "batch": cfg.train.batch_size, "guidance": cfg.sampler.guidance_scale > 1.0,
            "lora": [cfg.lora.rank, list(cfg.lora.target_modules)], "reward": cfg.reward_terms,
            "reward_options": cfg.reward.options, "decode_chunk": cfg.memory.decode_chunk, "dtype": str(dtype),
            "decode_impl": getattr(decode_frames, "__module__", "") + str(decode_frames.__code__.co_firstlineno),
            "fp8": [cfg.memory.fp8_weights, list(cfg.memory.fp8_keep_bf16)], "version": 8}


def cache_path() -> Path:
    root = os.environ.get("FASTVADER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastvader")
    return Path(root) / "memory_measurements.json"


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging

    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


@contextlib.contextmanager
def _meta_stays_put() -> Iterator[None]:
    """Some adapters park a part on the CPU as they are built (``text_encoder.cpu()``); a meta
    module has no data to move, so ``cpu()`` leaves meta modules where they are meanwhile."""
    original = nn.Module.cpu

    def cpu(module: nn.Module):
        if any(p.is_meta for p in module.parameters()):
            return module
        return original(module)

    nn.Module.cpu = cpu
    try:
        yield
    finally:
        nn.Module.cpu = original


class CpuIndicesFollowMeta(torch.utils._python_dispatch.TorchDispatchMode):
    """Meta tensors hold no values, so code that reads an index tensor's values (a mask's largest
    index, an end-of-text position) keeps it on the CPU when the model is on the meta device;
    when such a tensor meets meta tensors in an op, it moves to the meta device for that op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors) and any(t.device.type == "cpu" and t.dim() for t in tensors):
            args, kwargs = torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda t: t.to("meta") if t.device.type == "cpu" and t.dim() else t, (args, kwargs))
        return func(*args, **kwargs)


def build_on_meta(cfg: TrainConfig, dtype: torch.dtype):
    """The configured backbone and reward architectures (random init, no weights, nothing but the
    packaged configs read) on the meta device, LoRA injected: (backbone, reward, lora_params)."""
    from fastvader.backbones import build_backbone
    from fastvader.lora import add_lora
    from fastvader.rewards import build_reward_architecture

    from fastvader.memory.fp8 import Fp8Storage

    bcfg = dataclasses.replace(cfg.backbone, random_init=True, pretrained=None)
    with torch.device("meta"), _quiet(), _meta_stays_put():
        # .to("meta"): a few parameters ignore the device context (SVD's AlphaBlender builds its
        # mix factor with the legacy torch.Tensor constructor, on the CPU)
        backbone = build_backbone(bcfg, storage=Fp8Storage.from_config(cfg.memory)).freeze().to("meta", dtype)
        try:
            reward = build_reward_architecture(cfg.reward).freeze().to(dtype)
        except Exception as err:  # a reward of the user's own that cannot be built without its weights
            raise RuntimeError(f"the planner could not build reward {cfg.reward_terms} on the meta device "
                               f"({err}); plan with a reward that has random_init, or measure on a GPU") from err
        lora = add_lora(backbone.denoiser, cfg.lora.rank, cfg.lora.alpha, 0.0,
                        cfg.lora.target_modules or backbone.default_lora_targets, True)
    return backbone, reward, lora


def _planning_prompts(cfg: TrainConfig, batch: int) -> list[str]:
    """The first ``batch`` training prompts (rewards such as ``action`` read them)."""
    from fastvader.training.prompts import PromptSource

    pool = PromptSource.from_config(cfg.prompts).prompts
    return [pool[i % len(pool)] for i in range(batch)]


def target_device_type(cfg: TrainConfig) -> str:
    """Plans are for the GPU unless the config pins training to the CPU."""
    return "cpu" if cfg.train.device == "cpu" else "cuda"


def measure(cfg: TrainConfig, *, use_cache: bool = True, device_type: str | None = None) -> Measurements:
    """Measure (or read from the cache) the per-component figures for ``cfg``'s geometry."""
    device_type = device_type or target_device_type(cfg)
    dtype = activation_dtype(cfg, device_type)
    key = hashlib.sha1(json.dumps(_geometry_key(cfg, dtype), sort_keys=True, default=str).encode()).hexdigest()
    path = cache_path()
    cache: dict = {}
    if use_cache and path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return Measurements(**cache[key])
    from fastvader.console import stage

    with stage(f"measuring {cfg.backbone.name} on the meta device (cached for next time)", enabled=cfg.train.progress):
        m = _measure(cfg, dtype)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            cache[key] = m.to_json()
            path.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass  # a read-only home only costs a re-measurement
    return m


def _measure(cfg: TrainConfig, dtype: torch.dtype) -> Measurements:
    from fastvader.memory.checkpointing import checkpoint_units
    from fastvader.training.sampling import classifier_free_guidance

    backbone, reward, lora = build_on_meta(cfg, dtype)
    batch = cfg.train.batch_size
    shape = backbone.latent_shape(cfg.video.frames, cfg.video.height, cfg.video.width)
    latents = torch.empty(batch, *shape, device="meta", dtype=dtype)
    embeds = backbone.placeholder_conditioning(batch, dtype, shape)

    def call(x):
        return classifier_free_guidance(backbone, x, _TIMESTEP, embeds, cfg.sampler.guidance_scale)

    with gpu_like_attention():
        call_kept, call_peak = _measure_grad_calls(call, latents, backbone, reward)
        unit_peak = {policy: _largest_unit(call, latents, backbone, reward, policy) for policy in ("block", "sub_block")}
        unit_count = {policy: len(checkpoint_units(backbone.denoiser, policy)) for policy in ("block", "sub_block")}
        with torch.no_grad(), LivePeak() as live:
            call(latents)
        decode = _measure_decode(backbone, latents, cfg.memory.decode_chunk)
        reward_fixed, reward_per_frame = _measure_reward(backbone, reward, latents, _planning_prompts(cfg, batch))

    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        call(latents)
    text = getattr(backbone, "text_encoder", None)
    table = getattr(backbone.make_scheduler(cfg.sampler.name), "alphas_cumprod", None)  # grad steps index it
    lora_numel = sum(p.numel() for p in lora)
    return Measurements(
        scheduler_fixed=0 if table is None else table.numel() * table.element_size(),
        call_kept=call_kept, call_forward_peak=call_peak, unit_peak=unit_peak, nograd_working=live.peak,
        latent_bytes=latents.numel() * latents.element_size(), **decode,
        reward_kept_per_frame=reward_per_frame, reward_fixed=reward_fixed,
        params={"denoiser": _count(backbone.denoiser) - lora_numel, "lora": lora_numel, "vae": _count(backbone.vae),
                "reward": _count(reward), "text_encoder": _count(text if isinstance(text, nn.Module) else None)},
        lora_tensor_sizes=[p.numel() for p in lora], call_flops=int(flops.get_total_flops()), unit_count=unit_count,
        blocks=[_block_counts(block) for block in transformer_blocks(backbone.denoiser)])


def _block_counts(block: nn.Module) -> list[int]:
    """[other, fp8, scales]: the block's frozen elements in the weight dtype, in fp8, and fp8 scales."""
    from fastvader.memory.block_swap import frozen_tensors
    from fastvader.memory.fp8 import Fp8Linear

    counts = [0, 0, 0]
    for module, name, tensor in frozen_tensors(block):
        fp8 = isinstance(module, Fp8Linear)
        counts[1 if fp8 and name == "weight" else 2 if fp8 and name == "weight_scale" else 0] += tensor.numel()
    return counts


def _measure_grad_calls(call, latents: torch.Tensor, backbone, reward: nn.Module) -> tuple[dict, dict]:
    """Per checkpointing policy: what one gradient-carrying CFG call keeps for backward, and the
    peak while it runs forward."""
    from fastvader.memory.checkpointing import enable_checkpointing
    from fastvader.memory.offload import grad_step_wrapper

    kept, peak = {}, {}
    for policy in POLICIES:
        wrappers = enable_checkpointing(backbone.denoiser, policy)
        try:
            wrap = grad_step_wrapper(policy, False)
            step = wrap(lambda x, _t: call(x)) if wrap else (lambda x, _t: call(x))
            with LivePeak() as live, record_saved([backbone, reward], gpu_attention=False) as log:
                out = step(latents, _TIMESTEP)
            kept[policy], peak[policy] = log.total, live.peak
            del out
        finally:
            wrappers.revert()
    return kept, peak


def _largest_unit(call, latents: torch.Tensor, backbone, reward: nn.Module, policy: str) -> int:
    """The most any one unit that ``policy`` recomputes keeps inside (measured without
    checkpointing): the extra peak of recomputing it in backward."""
    from fastvader.memory.checkpointing import checkpoint_units

    sizes: dict[int, int] = {}
    with record_saved([backbone, reward], gpu_attention=False) as log:
        handles = []
        for i, unit in enumerate(checkpoint_units(backbone.denoiser, policy)):
            handles.append(unit.register_forward_pre_hook(lambda _m, _a, i=i: sizes.__setitem__(i, -log.total)))
            handles.append(unit.register_forward_hook(lambda _m, _a, _o, i=i: sizes.__setitem__(i, sizes[i] + log.total)))
        try:
            call(latents)
        finally:
            for h in handles:
                h.remove()
    return max(sizes.values(), default=0)


def _measure_decode(backbone, latents: torch.Tensor, decode_chunk: int) -> dict[str, int]:
    """What ``decode_frames`` keeps for one grad frame and for each further one (fit over 1 and
    2 frames), and the peak of backward through its first checkpointed unit, which recomputes
    that unit's activations (any VAE: the backbone decodes as in training)."""
    lat = latents.detach().requires_grad_(True)
    kept = []
    for n in (1, 2):
        with record_saved([backbone.vae]) as log:
            backbone.decode_frames(lat, list(range(n)), list(range(n)), chunk=decode_chunk)
        kept.append(log.total)
    unit = list(range(min(decode_chunk, latents.shape[2])))
    pixels = backbone.decode_frames(lat, unit, unit, chunk=decode_chunk)
    with LivePeak() as live:
        pixels.float().sum().backward()
    return {"decode_kept_first": kept[0], "decode_kept_per_frame": kept[1] - kept[0],
            "decode_recompute": live.peak}


def _measure_reward(backbone, reward: nn.Module, latents: torch.Tensor, prompts: list[str]) -> tuple[int, int]:
    """(fixed, per frame): what the reward keeps for backward, fit over 1 and 2 decoded frames."""
    with torch.no_grad():
        pixels = backbone.decode_frames(latents, [0, 1] if latents.shape[2] > 1 else [0])
    px = pixels.float().detach().requires_grad_(True)
    kept = []
    for n in ((1, 2) if px.shape[1] > 1 else (1,)):
        # a reward that scores a change gets a reference of the same shape (the base model's frames)
        reference = px[:, :n].detach() if reward.needs_reference else None
        with record_saved([reward]) as log, CpuIndicesFollowMeta():
            reward(px[:, :n], prompts, reference)
        kept.append(log.total)
    per_frame = kept[1] - kept[0] if len(kept) > 1 else kept[0]
    return max(kept[0] - per_frame, 0), per_frame


# ---------------------------------------------------------------------------------------------
# composing a prediction
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """The knobs the planner turns."""

    checkpointing: str = "sub_block"
    offload_activations: bool = False
    frozen_placement: str = "resident"
    optimizer: str = "adamw"
    block_swap: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Setting":
        m = cfg.memory
        swap = m.block_swap if isinstance(m.block_swap, int) else 0  # auto: the planner picks
        return cls(m.checkpointing, m.offload_activations, m.frozen_placement, cfg.optim.name, swap)

    def describe(self) -> str:
        parts = [f"checkpointing={self.checkpointing}"]
        parts.append("offload=on" if self.offload_activations else "offload=off")
        parts.append(f"frozen={self.frozen_placement}")
        parts.append(f"optim={self.optimizer}")
        if self.block_swap:
            parts.append(f"block_swap={self.block_swap}")
        return " ".join(parts)

    def overrides(self) -> list[str]:
        return [f"memory.checkpointing={self.checkpointing}",
                f"memory.offload_activations={str(self.offload_activations).lower()}",
                f"memory.frozen_placement={self.frozen_placement}", f"optim.name={self.optimizer}",
                f"memory.block_swap={self.block_swap}"]


@dataclass
class Prediction:
    setting: Setting
    peak: int
    parts: dict[str, int]
    relative_time: float
    #: seconds per step fp8 dequantisation and block swap transfers add (assumed rates)
    added_seconds: dict[str, float] = field(default_factory=dict)
    host_bytes: int = 0  # pinned host memory of the swapped blocks

    def fits(self, budget: int) -> bool:
        return self.peak <= budget * HEADROOM


def _optimizer_state_bytes(name: str, tensor_sizes: list[int]) -> int:
    """AdamW keeps two fp32 moments; bitsandbytes 8-bit keeps two uint8 moments (+ a small
    per-block scale), except for tensors under 4096 elements, which stay 32-bit."""
    total = 0
    for n in tensor_sizes:
        if name in ("adamw8bit", "paged_adamw8bit") and n >= 4096:
            total += 2 * n + 8 * math.ceil(n / 256)
        else:
            total += 8 * n
    return total


def _count_frames(mode: str, arg, out_of: int) -> int:
    if mode in ("all", "same"):
        return out_of
    if mode == "random":
        return min(arg, out_of)
    if mode == "stride":
        return -(-out_of // arg)
    return min(len(arg), out_of)


def _frames_with_grad(cfg: TrainConfig) -> tuple[int, int]:
    """(frames the reward sees, frames that carry gradients) at most, per video."""
    f = cfg.video.frames
    seen = _count_frames(*parse_frame_spec(cfg.frames.reward, f, "frames.reward"), f)
    grad = _count_frames(*parse_frame_spec(cfg.frames.grad, f, "frames.grad"), seen)
    return seen, grad


def predict(cfg: TrainConfig, m: Measurements, setting: Setting | None = None) -> Prediction:
    """The peak of one training step of ``cfg`` under ``setting`` (default: the config's own)."""
    s = setting or Setting.from_config(cfg)
    target = target_device_type(cfg)
    wbytes = _DTYPE_BYTES[weight_dtype_name(cfg, target)]
    act_bytes = torch.tensor([], dtype=activation_dtype(cfg, target)).element_size()
    k = denoiser_calls(cfg)[1]
    seen, grad_frames = _frames_with_grad(cfg)
    p = m.params
    parts: dict[str, int] = {}
    frozen_weights = frozen_weight_parts(m, s.block_swap, wbytes)
    parts["denoiser weights"] = frozen_weights["resident"]
    parts["lora + grads + optimizer"] = 8 * p["lora"] + _optimizer_state_bytes(s.optimizer, m.lora_tensor_sizes)
    frozen = (p["vae"] + p["reward"]) * wbytes
    parts["frozen models (resident)" if s.frozen_placement == "resident" else "frozen models (on demand)"] = frozen
    static = parts["denoiser weights"] + parts["lora + grads + optimizer"]
    resident_frozen = frozen if s.frozen_placement == "resident" else 0

    # the scheduler's update multiplies by constants: it keeps nothing latent-sized
    per_step = m.call_kept[s.checkpointing]
    if s.offload_activations:
        per_step = m.latent_bytes  # everything large moves to the host; count one latent for small leftovers
    # fp32 base weights under half autocast: each linear/conv keeps a half copy of its weight
    # for backward, once per grad step without checkpointing (once per unit otherwise)
    weight_copies = p["denoiser"] * act_bytes if wbytes > act_bytes else 0
    if s.checkpointing == "none":  # autograd keeps each swapped block's GPU copy until backward
        per_step += weight_copies + frozen_weights["swapped"]
    in_flight = frozen_weights["in flight"]
    if in_flight:
        parts["block swap: blocks in flight"] = in_flight
    kept = k * per_step + m.scheduler_fixed
    recompute = {"none": 0, "block": m.unit_peak["block"], "sub_block": m.unit_peak["sub_block"],
                 "step": m.call_kept["sub_block"] + m.unit_peak["sub_block"]}[s.checkpointing]
    if s.offload_activations and s.checkpointing == "none":
        recompute += m.call_kept["none"]
    elif s.offload_activations and s.checkpointing != "step":
        # backward brings one unit's offloaded inputs back at a time, to recompute it (the H200
        # run of K=10 with sub_block + offload measured 6.89 GiB where counting them all gave 8.61)
        recompute += m.call_kept[s.checkpointing] // max(1, m.unit_count.get(s.checkpointing, 1))
    decode_kept = m.decode_kept_first + (grad_frames - 1) * m.decode_kept_per_frame
    reward_kept = m.reward_fixed + seen * m.reward_kept_per_frame
    parts["activations kept (K grad steps)"] = kept
    parts["decode kept"] = decode_kept
    parts["reward kept"] = reward_kept
    parts["backward recompute"] = max(recompute, m.decode_recompute)
    # backward runs the reward's, the decode's, then the denoiser's part; each part's saved
    # tensors are freed as it finishes, so the reward's are gone when the decode recomputes
    # and both are gone when the denoiser recomputes
    phases = {
        "sampling": resident_frozen + m.nograd_working + in_flight,
        "grad forward": resident_frozen + (k - 1) * per_step + m.call_forward_peak[s.checkpointing] + in_flight,
        "backward: reward, decode": frozen + kept + decode_kept + 4 * p["lora"] + max(reward_kept, m.decode_recompute),
        "backward: denoiser": frozen + kept + 4 * p["lora"] + recompute + in_flight,
    }
    parts.update({f"phase: {name}": v for name, v in phases.items()})
    peak = static + max(phases.values())

    cost = denoiser_calls(cfg)[0] + k * GRAD_STEP_COST[s.checkpointing]
    cost += k * OFFLOAD_COST_PER_GRAD_STEP if s.offload_activations else 0
    cost += ON_DEMAND_COST if s.frozen_placement == "on_demand" else 0
    added = frozen_weight_seconds(cfg, m, s, wbytes)
    call_seconds = m.call_flops / GPU_FLOPS
    if call_seconds > 0:
        cost += sum(added.values()) / call_seconds
    return Prediction(s, int(peak), parts, cost, added, frozen_weights["swapped"])


# ---------------------------------------------------------------------------------------------
# frozen weights: fp8 storage and block swap
# ---------------------------------------------------------------------------------------------
def _block_bytes(counts: list[int], wbytes: int) -> int:
    other, fp8, scales = counts
    return other * wbytes + fp8 + 4 * scales


def frozen_weight_parts(m: Measurements, block_swap: int, wbytes: int) -> dict[str, int]:
    """Bytes of the denoiser's frozen weights: ``resident`` on the GPU, ``swapped`` (the last
    ``block_swap`` blocks, in host memory) and ``in flight`` (the two largest swapped blocks: one
    runs while the next is prefetched)."""
    fp8 = sum(c[1] for c in m.blocks)
    scales = sum(c[2] for c in m.blocks)
    total = (m.params["denoiser"] - fp8 - scales) * wbytes + fp8 + 4 * scales
    swapped = sorted((_block_bytes(c, wbytes) for c in m.blocks[len(m.blocks) - block_swap:]), reverse=True)
    swapped = swapped if block_swap else []
    return {"resident": total - sum(swapped), "swapped": sum(swapped), "in flight": sum(swapped[:2])}


def denoiser_calls(cfg: TrainConfig) -> tuple[int, int]:
    """(no-grad, gradient-carrying) denoiser calls of the longest rollout ``cfg`` draws: the last K
    steps carry gradients; ``x0:A-B`` stops the chain with one gradient call, A steps from the end."""
    steps = cfg.sampler.steps
    mode, k_min, k_max = parse_truncation(cfg.sampler.truncation, steps)
    if mode == "x0":
        return steps - k_min, 1
    return steps - k_max, k_max


def frozen_weight_seconds(cfg: TrainConfig, m: Measurements, s: Setting, wbytes: int) -> dict[str, float]:
    """Seconds per training step that block swap transfers (beyond what overlaps compute) and fp8
    dequantisation add, at the assumed rates; one entry per technique in use."""
    nograd, k = denoiser_calls(cfg)
    passes = nograd + k * (1 + RECOMPUTE_PASSES[s.checkpointing])  # denoiser passes that swap blocks in
    out: dict[str, float] = {}
    if s.block_swap and m.blocks:
        block_compute = m.call_flops / GPU_FLOPS / len(m.blocks)
        exposed = sum(max(0.0, _block_bytes(c, wbytes) / HOST_TO_GPU_BYTES_PER_S - block_compute)
                      for c in m.blocks[len(m.blocks) - s.block_swap:])
        out["block swap"] = passes * exposed
    fp8 = sum(c[1] for c in m.blocks)
    if fp8:  # read one byte, write two, per weight, per pass (backward dequantises once more)
        out["fp8 dequantisation"] = (passes + k) * 3 * fp8 / GPU_BYTES_PER_S
    return out


def candidate_settings(cfg: TrainConfig, m: Measurements | None = None) -> list[Setting]:
    """Every checkpointing policy x activation offload x frozen placement x optimizer: AdamW, the
    config's own, and bitsandbytes' AdamW8bit (not under DeepSpeed ZeRO, which refuses it) x
    blocks swapped: the config's number, or every number from 0 to all blocks (``auto``; needs
    ``m``)."""
    optimizers = dict.fromkeys(["adamw", cfg.optim.name] + ([] if cfg.memory.zero_stage else ["adamw8bit"]))
    swap = cfg.memory.block_swap
    swaps = range(len(m.blocks) + 1) if swap == "auto" and m is not None else [swap if isinstance(swap, int) else 0]
    return [Setting(c, o, f, opt, n) for c in POLICIES for o in (False, True)
            for f in ("resident", "on_demand") for opt in optimizers for n in swaps]


@dataclass
class Plan:
    budget: int
    current: Prediction
    ranked: list[Prediction]  # fitting settings, fastest first
    notes: list[str] = field(default_factory=list)  # fp8 and block swap: what they engage, cost, or why not

    @property
    def best(self) -> Prediction | None:
        return self.ranked[0] if self.ranked else None

    def table(self, limit: int = 12) -> str:
        base = self.current.relative_time
        def gib(n: int) -> str:
            return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"

        lines = [f"budget {self.budget / GiB:.1f} GiB (settings must fit {HEADROOM:.0%} of it); "
                 f"config as given: {self.current.peak / GiB:.2f} GiB, "
                 f"{'fits' if self.current.fits(self.budget) else 'does NOT fit'}",
                 f"{'#':>2}  {'predicted peak':>14}  {'rel. time':>9}  setting"]
        shown, seen = [], set()
        for pred in self.ranked:  # one row per memory setting: its fastest/fewest-change optimizer
            key = (pred.setting.checkpointing, pred.setting.offload_activations, pred.setting.frozen_placement)
            if key not in seen:
                seen.add(key)
                shown.append(pred)
        for i, pred in enumerate(shown[:limit], 1):
            lines.append(f"{i:>2}  {gib(pred.peak):>14}  {pred.relative_time / base:>8.2f}x  "
                         f"{pred.setting.describe()}")
        if not self.ranked:
            lines.append("    nothing fits: lower video size or frames.grad, or use more GPUs")
        lines.extend(self.notes)
        lines.append("composition of the config as given (bytes predicted from meta-device measurements):")
        for name, v in self.current.parts.items():
            lines.append(f"    {name:<34} {gib(v):>12}")
        return "\n".join(lines)


def make_plan(cfg: TrainConfig, budget: int | str, m: Measurements | None = None) -> Plan:
    budget = parse_bytes(budget, "gpu_memory")
    m = m or measure(cfg)
    own = Setting.from_config(cfg)
    if cfg.memory.block_swap == "auto":  # as given = the fewest swapped blocks that fit (or all of them)
        own = next((s for s in (dataclasses.replace(own, block_swap=n) for n in range(len(m.blocks) + 1))
                    if predict(cfg, m, s).fits(budget)), dataclasses.replace(own, block_swap=len(m.blocks)))
    current = predict(cfg, m, own)
    preds = [predict(cfg, m, s) for s in candidate_settings(cfg, m)]

    def changes(s: Setting) -> int:
        return sum(a != b for a, b in zip(dataclasses.astuple(s), dataclasses.astuple(own)))

    # ties in time go to fewer swapped blocks (less host memory and PCIe traffic), then fewer changes
    fitting = sorted((p for p in preds if p.fits(budget)),
                     key=lambda p: (round(p.relative_time, 6), p.setting.block_swap, changes(p.setting), p.peak))
    plan = Plan(budget, current, fitting)
    plan.notes = frozen_weight_notes(cfg, m, plan.best or current)
    return plan


def frozen_weight_notes(cfg: TrainConfig, m: Measurements, pred: Prediction) -> list[str]:
    """What fp8 storage and block swap do in ``pred``, or why they cannot engage."""
    mem = cfg.memory
    if not m.blocks:
        asked = [f"memory.{n}={v!r}" for n, v in (("fp8_weights", mem.fp8_weights), ("block_swap", mem.block_swap)) if v]
        return [f"{', '.join(asked)} cannot engage: the denoiser has no repeated transformer blocks"] if asked else []
    wbytes = _DTYPE_BYTES[weight_dtype_name(cfg, target_device_type(cfg))]
    notes = []
    fp8 = sum(c[1] for c in m.blocks)
    if fp8:
        full = (m.params["denoiser"] - sum(c[2] for c in m.blocks)) * wbytes  # without the scales, in one dtype
        notes.append(f"fp8 frozen weights: denoiser {format_size(frozen_weight_parts(m, 0, wbytes)['resident'])} "
                     f"instead of {format_size(full)}; dequantisation adds "
                     f"~{pred.added_seconds.get('fp8 dequantisation', 0.0):.2f} s per step")
    n = pred.setting.block_swap
    if n:
        nograd, k = denoiser_calls(cfg)
        passes = nograd + k * (1 + RECOMPUTE_PASSES[pred.setting.checkpointing])
        transfer = passes * pred.host_bytes / HOST_TO_GPU_BYTES_PER_S
        shown = pred.added_seconds.get("block swap", 0.0)
        notes.append(f"block swap: memory.block_swap={n} of {len(m.blocks)} blocks, {format_size(pred.host_bytes)} in "
                     f"pinned host memory; {transfer:.1f} s of transfers per step, ~{shown:.1f} s not hidden behind "
                     f"compute (assumed {HOST_TO_GPU_BYTES_PER_S / 1e9:.0f} GB/s host-to-GPU, "
                     f"{GPU_FLOPS / 1e12:.0f} TFLOP/s)")
    elif mem.block_swap == "auto":
        notes.append("block swap: memory.block_swap=auto needs no swapped block here (0)")
    return notes


def apply_setting(cfg: TrainConfig, s: Setting) -> TrainConfig:
    memory = dataclasses.replace(cfg.memory, checkpointing=s.checkpointing, offload_activations=s.offload_activations,
                                 frozen_placement=s.frozen_placement, block_swap=s.block_swap)
    new = cfg.replace(memory=memory, optim=dataclasses.replace(cfg.optim, name=s.optimizer))
    return new.validate()


def apply_best_plan(cfg: TrainConfig, verbose: bool = True) -> TrainConfig:
    """The config with the fastest setting that fits ``memory.gpu_memory`` (unchanged when the
    config already is that setting); ``memory.block_swap=auto`` without a budget plans for the
    CUDA card's memory. Raises ConfigError when nothing fits."""
    from fastvader.config import ConfigError

    budget = cfg.memory.gpu_memory
    if budget is None:
        if not torch.cuda.is_available():
            raise ConfigError("config: memory.block_swap='auto' plans for a GPU's memory and there is no CUDA "
                              "device: set memory.gpu_memory, or a number of blocks")
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    plan = make_plan(cfg, budget)
    if plan.best is None:
        raise ConfigError(f"config: memory.gpu_memory={cfg.memory.gpu_memory!r}: no memory setting fits "
                          f"(the config as given needs {plan.current.peak / GiB:.1f} GiB); lower video size, "
                          "frames.grad or sampler.truncation, or train on several GPUs")
    if verbose:
        print(f"fastvader plan: {plan.best.setting.describe()} "
              f"(predicted peak {plan.best.peak / GiB:.2f} GiB of {plan.budget / GiB:.1f} GiB)")
        for note in plan.notes:
            print(f"fastvader plan: {note}")
    return apply_setting(cfg, plan.best.setting)


def format_size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"


def oom_message(cfg: TrainConfig, err: BaseException, device: torch.device) -> str:
    """What to say when a step runs out of GPU memory: the card, the prediction, and what the
    planner would change to fit it."""
    total = None
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
    head = f"CUDA out of memory in a training step ({str(err).splitlines()[0] if str(err) else 'no detail'})."
    try:
        m = measure(cfg)
        budget = total or parse_bytes(cfg.memory.gpu_memory or "24GiB")
        plan = make_plan(cfg, budget, m)
        lines = [head, f"The planner predicts {format_size(plan.current.peak)} for this config on a "
                       f"{format_size(budget)} budget."]
        if plan.best is not None and plan.best.setting == Setting.from_config(cfg):
            lines.append("The planner expects this config to fit; the difference is fragmentation or memory "
                         "outside the step: try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, fewer "
                         "frames.grad or memory.decode_chunk=1.")
        elif plan.best is not None:
            lines.append("It would change: " + " ".join(
                o for o, cur in zip(plan.best.setting.overrides(), Setting.from_config(cfg).overrides()) if o != cur)
                + f" (predicted {format_size(plan.best.peak)}). Pass these with --set, or run with "
                f"--gpu-memory {budget}B to apply it.")
        else:
            lines.append("No memory setting fits: lower video size, frames.grad or sampler.truncation.")
        return "\n".join(lines)
    except Exception as plan_err:  # the advice must never hide the OOM itself
        return (f"{head} Try, in order: --set memory.checkpointing=step, memory.offload_activations=true, "
                f"memory.frozen_placement=on_demand, optim.name=adamw8bit, fewer frames.grad "
                f"(the planner could not run: {plan_err})")
