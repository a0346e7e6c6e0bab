"""The typed configuration: one dataclass per section, loaded from YAML plus ``--set`` overrides
and validated before any model is built. Every error names the field, the bad value and what
is allowed."""
from __future__ import annotations

import dataclasses
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Optional, Union

import yaml

from fastvader.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work. The message says which field and what to do."""


def _err(field_name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config: {field_name}={value!r} is invalid: {allowed}")


#: A field that is auto, on or off. YAML 1.1 reads unquoted on/off/yes/no/true/false as booleans,
#: so `--set kernels.enabled=off` arrives as False: booleans and those words become "on"/"off".
Switch = typing.NewType("Switch", str)
SWITCH_VALUES = ("auto", "on", "off")

#: A field that is a count or "auto" (YAML gives an int or a string; validation checks which).
BlockCount = typing.NewType("BlockCount", object)


def switch_word(value: Any) -> Any:
    """True/"yes"/"ON" -> "on", False/"no"/"false" -> "off", "Auto" -> "auto"; anything else
    is returned as it came, for validation to name."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        word = value.strip().lower()
        return {"true": "on", "yes": "on", "false": "off", "no": "off"}.get(word, word)
    return value


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    name: str = "toy"
    #: hub id or local folder/file; None = the family's default weights
    pretrained: Optional[str] = None
    #: build the real architecture with random weights (benchmarks, tests); no download
    random_init: bool = False
    #: for random_init: a folder of architecture config files (JSON/YAML) to use instead of the
    #: ones packaged in fastvader/model_configs
    config_path: Optional[str] = None
    #: dtype of frozen parts and the denoiser's base weights: auto (bf16 on GPU, fp32 on CPU)
    dtype: str = "auto"
    #: family-specific keyword arguments
    options: dict = field(default_factory=dict)


@dataclass
class VideoConfig:
    frames: int = 8
    height: int = 32
    width: int = 32
    fps: int = 8


TRUNCATION_RE = re.compile(r"^(last|rand|specific:(\d+)|range:(\d+)-(\d+)|x0:(\d+)-(\d+))$")


@dataclass
class SamplerConfig:
    #: ddim | dpm++ | euler (EDM-style Euler: SVD) | euler_flow
    name: str = "ddim"
    steps: int = 25
    eta: float = 0.0
    guidance_scale: float = 7.5
    #: which denoising steps carry gradients: last (K=1), rand (K drawn in 1..steps once per
    #: video), specific:K (the last K), range:A-B (K drawn in A..B once per video); x0:A-B stops
    #: the chain K steps (drawn in A..B) before its end and scores the clean latents that step's
    #: one gradient call predicts (ImageReward's ReFL; ddim and euler)
    truncation: str = "last"


FRAME_SPEC_RE = re.compile(r"^(all|same|random:(\d+)|stride:(\d+)|list:(\d+(?:,\d+)*))$")


@dataclass
class FramesConfig:
    """Which decoded frames the reward sees, and which of those carry gradients.

    ``reward``: all | random:K | stride:S | list:0,5,9 (VADER: random:1).
    ``grad``: same (every frame the reward sees carries gradients) or a spec applied to the
    reward's frames (e.g. random:2: the reward sees all selected frames, gradients flow through
    two of them; the rest are decoded without gradients)."""

    reward: str = "random:1"
    grad: str = "same"


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    #: peft target_modules; empty = the backbone's default
    target_modules: list = field(default_factory=list)
    init_weights: bool = True
    #: start training from this LoRA file (any layout fastvader reads); its rank, alpha and
    #: modules shape the adapters
    init_from: Optional[str] = None


@dataclass
class RewardConfig:
    #: a reward or preset name (shorthand for terms={name: 1.0})
    name: Optional[str] = "target_color"
    #: weighted sum {name: weight}; overrides name when given
    terms: dict = field(default_factory=dict)
    #: constructor arguments per reward: {target_color: {color: red}}
    options: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    #: adamw | adamw8bit | paged_adamw8bit
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_accum: int = 1
    max_grad_norm: float = 1.0


@dataclass
class PromptConfig:
    #: an explicit list of training prompts: texts, or {text: ..., image: path} for image-to-video
    #: (a folder as image: one prompt per image in it)
    items: list = field(default_factory=list)
    #: a text file, one prompt a line
    file: Optional[str] = None
    #: a generator template such as "<animal> <activity>", filled from `vocab`
    template: Optional[str] = None
    vocab: dict = field(default_factory=dict)
    #: image-to-video: the conditioning image (or a folder: one prompt per image) of every prompt
    #: that names none
    image: Optional[str] = None
    #: how a conditioning image meets the video size: stretch (the diffusers pipelines' resize; an
    #: aspect ratio it would change by over 5% is refused) | crop (keep the aspect ratio, cut the centre)
    image_resize: str = "stretch"


@dataclass
class ValidationConfig:
    prompts: list = field(default_factory=list)
    seeds: list = field(default_factory=lambda: [0])
    #: validate every N steps (0 = only before and after training)
    every: int = 0
    #: write before/after sample videos (mp4 + gif)
    save_videos: bool = True


@dataclass
class MemoryConfig:
    #: denoiser checkpointing during grad steps: none | block | sub_block | step
    checkpointing: str = "sub_block"
    #: frames decoded per checkpointed chunk in decode_frames
    decode_chunk: int = 1
    #: move saved activations of the grad steps to (pinned) CPU memory
    offload_activations: bool = False
    #: frozen models (VAE, reward, text encoder): resident | on_demand
    frozen_placement: str = "resident"
    #: a memory budget such as "24GiB": the planner picks settings that fit
    gpu_memory: Optional[str] = None
    #: DeepSpeed ZeRO stage for the trainable weights' optimizer: 0 (off) | 2 | 3
    zero_stage: int = 0
    #: with ZeRO: none | optimizer (states on the CPU) | optimizer+params (stage 3 only)
    zero_offload: str = "none"
    #: store the denoiser's frozen Linear weights inside its transformer blocks in fp8 (e4m3,
    #: one scale per output channel), dequantised layer by layer; LoRA keeps its own dtype
    fp8_weights: bool = False
    #: module-name patterns (fnmatch, e.g. "*.ffn.*") of Linear layers inside the blocks that stay
    #: in backbone.dtype; everything outside the blocks (embeddings, first/last projections) always does
    fp8_keep_bf16: list = field(default_factory=list)
    #: transformer blocks whose frozen weights wait in host memory and visit the GPU only while they
    #: run: 0, N (the last N) or auto (the planner's N for memory.gpu_memory or the card)
    block_swap: BlockCount = 0


@dataclass
class KernelConfig:
    #: fastvader.apply on the denoiser and VAE: auto (on CUDA) | on | off
    enabled: Switch = "auto"
    #: which ops; empty = all registered
    ops: list = field(default_factory=list)


COMPILE_MODES = ("auto", "off", "regional", "full")


@dataclass
class SpeedConfig:
    """The rollout's no-grad denoiser calls at compiled, graph-captured speed (docs/speed.md).
    ``auto`` engages on CUDA and stays off on the CPU; a setting that cannot engage says so once
    and the run goes on without it."""

    #: torch.compile of the denoiser: auto (regional on CUDA) | off | regional (its repeated
    #: blocks, compiled once per block shape) | full (the whole denoiser: longer compile)
    compile: Switch = "auto"
    #: the gradient-carrying denoiser calls run compiled too (false: eagerly)
    compile_grad_steps: bool = False
    #: torch.compile backend: inductor; aot_eager or eager isolate a compile problem
    compile_backend: str = "inductor"
    #: keep compiled artifacts for the next run (torch's mega-cache, one file per denoiser class)
    compile_cache: bool = True
    #: where: None = ~/.cache/fastvader/compile (or under $XDG_CACHE_HOME)
    compile_cache_dir: Optional[str] = None
    #: replay the rollout's no-grad denoiser calls as CUDA graphs: auto (on CUDA) | on | off
    cuda_graphs: Switch = "auto"
    #: convolution weights in channels_last memory format: auto (on CUDA) | on | off
    channels_last: Switch = "auto"
    #: fp8 matmuls (torchao) in the linear layers of the no-grad calls; GPUs with fp8 (sm_89+)
    fp8_rollout: bool = False


@dataclass
class LoopConfig:
    steps: int = 100
    batch_size: int = 1
    seed: int = 0
    #: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    precision: str = "auto"
    #: auto | cpu | cuda | cuda:N
    device: str = "auto"
    output_dir: str = "runs"
    #: the run folder's name under output_dir; a run folder belongs to one run (docs/runs.md)
    run_name: str = "run"
    #: write a checkpoint every N steps (0 = by time only) ...
    checkpoint_every: int = 100
    #: ... and whenever this many minutes passed since the last one (0 = by steps only); the run's
    #: end and an interrupt (Ctrl-C, SIGTERM) always write one
    checkpoint_minutes: float = 15.0
    #: keep this run's newest N step checkpoints (0 = all)
    keep_checkpoints: int = 2
    progress: bool = True
    #: torch intra-op threads on the CPU (0 = torch's default); tiny models run fastest on 1
    cpu_threads: int = 0


@dataclass
class GuardConfig:
    """Numerical guards and the "did it learn?" checks (docs/trust.md)."""

    #: stop the run after this many consecutive skipped (NaN/Inf) steps
    max_bad_steps: int = 5
    #: allow fp16 on a family that ships in bf16 (Wan, CogVideoX, Open-Sora); overflows are likely
    allow_fp16: bool = False
    #: after the first backward, confirm every configured memory technique and kernel engaged
    self_check: bool = True
    #: fail at the first step when no gradient reaches the LoRA (detached latent, frozen path)
    require_gradient: bool = True
    #: the summary warns when the mean gradient norm is below this
    min_grad_norm: float = 1e-8
    #: ... when the LoRA weights moved less than this, relative to their norm at the start
    min_lora_change: float = 1e-6
    #: ... when the training reward changed less than this (last steps against the first steps)
    min_reward_change: float = 1e-6
    #: how many of the first (and last) steps the reward change compares
    reward_window: int = 3


@dataclass
class SafeguardConfig:
    """Reward-hacking safeguards around the validation (held-out) prompts (docs/trust.md)."""

    #: a second reward (name or preset) scored on the held-out videos but never optimised
    second_reward: Optional[str] = None
    second_reward_options: dict = field(default_factory=dict)
    #: stop when the held-out training reward has not risen for this many rounds (0 = off)
    early_stop_patience: int = 0
    #: a rise smaller than this does not count as rising
    early_stop_min_delta: float = 0.0
    #: stop when the second reward falls more than this below its first round (None = off)
    second_reward_max_drop: Optional[float] = None
    #: keep the aligned model near the base: none | denoiser (penalise the LoRA's effect on the
    #: denoiser output at the grad steps)
    regularizer: str = "none"
    regularizer_weight: float = 0.0
    #: a first/middle/last frame grid per validation round in samples/ and in the logs
    sample_grids: bool = True


@dataclass
class LoggingConfig:
    """Where scalars, sample videos and the reward curve go besides metrics.jsonl."""

    tensorboard: bool = True
    #: Weights & Biases, only when asked for and installed
    wandb: bool = False
    wandb_project: str = "fastvader"
    #: online | offline | disabled (None = wandb's default)
    wandb_mode: Optional[str] = None
    #: send sample videos (as GIFs) to the backends
    videos: bool = True


@dataclass
class TrainConfig:
    """Everything a run needs. Build with ``TrainConfig.from_yaml`` or ``load_config``."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    frames: FramesConfig = field(default_factory=FramesConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    safeguards: SafeguardConfig = field(default_factory=SafeguardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None, *, base_dir: str | Path | None = None) -> "TrainConfig":
        """``base_dir``: the folder of the YAML file the data came from; a relative
        ``prompts.file`` is looked for in the working folder, then there."""
        cfg = _build(cls, data or {}, "")
        cfg.prompts = _with_prompt_file_resolved(cfg.prompts, base_dir)
        cfg.prompts, cfg.validation = _with_image_paths_resolved(cfg.prompts, cfg.validation, base_dir)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "TrainConfig":
        return load_config(path, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections) -> "TrainConfig":
        return dataclasses.replace(self, **sections)

    # -- derived values ------------------------------------------------------------------------
    @property
    def reward_terms(self) -> dict[str, float]:
        if self.reward.terms:
            return {str(k): float(v) for k, v in self.reward.terms.items()}
        return {str(self.reward.name): 1.0}

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.train.run_name

    def validate(self) -> "TrainConfig":
        validate(self)
        return self


# ---------------------------------------------------------------------------------------------
# building dataclasses from plain data, with type checks
# ---------------------------------------------------------------------------------------------
#: Fields that are gone, with what an old config (or a run's saved config.yaml) that sets one
#: should do instead.
REMOVED_FIELDS = MappingProxyType({
    "train.log_every": "every step is logged (metrics.jsonl and the logging backends); delete the key",
})


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _err(where, value, f"expected a mapping of {tp.__name__} fields")
        return _build(tp, value, where + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _err(where, value, "expected true or false")
    if tp is Switch:
        if not isinstance(value, (bool, str)):
            raise _err(where, value, f"expected one of {list(SWITCH_VALUES)}")
        return switch_word(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(where, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(where, value, "expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _err(where, value, "expected a string")
        return value
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _err(where, value, "expected a list")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _err(where, value, "expected a mapping")
        return value
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise _err(prefix.rstrip(".") or "config", data, "expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for key in (prefix + k for k in unknown):
        if key in REMOVED_FIELDS:
            raise ConfigError(f"config: {key} was removed: {REMOVED_FIELDS[key]}")
    if unknown:
        raise ConfigError(f"config: unknown key(s) {[prefix + k for k in unknown]}; "
                          f"{(prefix.rstrip('.') or 'the top level')} accepts {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _with_prompt_file_resolved(prompts: PromptConfig, base_dir: str | Path | None) -> PromptConfig:
    """The section with ``file`` made absolute when it is found (in the working folder, else
    beside the config), so that the config stays usable wherever it goes next: rebuilt by
    ``dataclasses.replace``, or saved into a run folder and loaded from there on resume."""
    if not prompts.file:
        return prompts
    path = Path(os.path.expanduser(prompts.file))
    candidates = [path] if path.is_absolute() or base_dir is None else [path, Path(base_dir) / path]
    found = next((c for c in candidates if c.is_file()), None)
    return prompts if found is None else dataclasses.replace(prompts, file=os.path.abspath(found))


def _resolved_path(value: Any, base_dir: str | Path | None) -> Any:
    """A relative path made absolute where it exists (the working folder, else ``base_dir``)."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(os.path.expanduser(value))
    candidates = [path] if path.is_absolute() or base_dir is None else [path, Path(base_dir) / path]
    found = next((c for c in candidates if c.exists()), None)
    return value if found is None else os.path.abspath(found)


def _with_image_paths_resolved(prompts: PromptConfig, validation: "ValidationConfig",
                               base_dir: str | Path | None) -> tuple[PromptConfig, "ValidationConfig"]:
    """Conditioning-image paths (``prompts.image`` and ``image`` of prompt entries) found as
    ``prompts.file`` is, made absolute."""
    def entries(items: list) -> list:
        return [{**item, "image": _resolved_path(item["image"], base_dir)} if isinstance(item, dict) and "image" in item
                else item for item in items]

    return (dataclasses.replace(prompts, items=entries(prompts.items), image=_resolved_path(prompts.image, base_dir)),
            dataclasses.replace(validation, prompts=entries(validation.prompts)))


# ---------------------------------------------------------------------------------------------
# YAML and overrides
# ---------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.steps=50' -> (['train', 'steps'], 50). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.steps=50)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        return path, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text}: the value is not valid YAML ({_yaml_problem(err)}); quote text that "
                          "holds YAML characters, e.g. --set 'prompts.items=[\"a cat, jumping\"]'") from None


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """Where and what, from a PyYAML error: 'line 3, column 8: expected ',' or ']', but got ':''."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def read_config_file(path: Path) -> dict:
    """A config file's sections; a missing, unreadable, empty or non-mapping file is refused by name."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text file") from None
    if data is None:
        raise ConfigError(f"config file {str(path)!r} is empty; give at least the prompts "
                          "(see configs/demo.yaml), or leave out --config to start from the defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not a {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                *, validate_now: bool = True) -> TrainConfig:
    """Read YAML (or start from defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    base_dir = None
    if path is not None:
        p = Path(path)
        data = read_config_file(p)
        base_dir = p.parent
    data = apply_overrides(data, overrides)
    cfg = TrainConfig.from_dict(data, base_dir=base_dir)
    if validate_now:
        validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# semantic validation
# ---------------------------------------------------------------------------------------------
def parse_truncation(spec: str, steps: int) -> tuple[str, int, int]:
    """-> (mode, k_min, k_max): the number of grad steps is drawn in [k_min, k_max]; for ``x0``
    the chain stops K steps before its end and one gradient call predicts the clean latents."""
    m = TRUNCATION_RE.match(spec)
    if not m:
        raise _err("sampler.truncation", spec, "use last, rand, specific:K, range:A-B or x0:A-B")
    if m.group(5) is not None:
        a, b = int(m.group(5)), int(m.group(6))
        if not 1 <= a <= b <= steps:
            raise _err("sampler.truncation", spec, f"need 1 <= A <= B <= sampler.steps={steps}")
        return "x0", a, b
    if spec == "last":
        return "last", 1, 1
    if spec == "rand":
        return "rand", 1, steps
    if m.group(2) is not None:
        k = int(m.group(2))
        if not 1 <= k <= steps:
            raise _err("sampler.truncation", spec, f"K must be between 1 and sampler.steps={steps}")
        return "specific", k, k
    a, b = int(m.group(3)), int(m.group(4))
    if not 1 <= a <= b <= steps:
        raise _err("sampler.truncation", spec, f"need 1 <= A <= B <= sampler.steps={steps}")
    return "range", a, b


def parse_frame_spec(spec: str, num_frames: int, field_name: str) -> tuple[str, Any]:
    """'random:2' -> ('random', 2); checks the frames exist in a video of ``num_frames``."""
    if isinstance(spec, list):
        spec = "list:" + ",".join(str(i) for i in spec)
    m = FRAME_SPEC_RE.match(str(spec))
    if not m:
        raise _err(field_name, spec, "use all, random:K, stride:S or list:I,J,... (grad also takes same)")
    if spec in ("all", "same"):
        return spec, None
    if m.group(2) is not None:
        k = int(m.group(2))
        if not 1 <= k <= num_frames:
            raise _err(field_name, spec, f"K must be between 1 and video.frames={num_frames}")
        return "random", k
    if m.group(3) is not None:
        s = int(m.group(3))
        if s < 1:
            raise _err(field_name, spec, "the stride must be at least 1")
        return "stride", s
    idx = [int(i) for i in m.group(4).split(",")]
    bad = [i for i in idx if i >= num_frames]
    if bad:
        raise _err(field_name, spec, f"frames {bad} are outside the video (video.frames={num_frames}, "
                                     f"indices 0..{num_frames - 1})")
    if len(set(idx)) != len(idx):
        raise _err(field_name, spec, "frame indices must not repeat")
    return "list", idx


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise _err(name, value, "must be " + ("zero or positive" if allow_zero else "a positive number"))


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise _err(name, value, f"choose one of {list(allowed)}")


def validate(cfg: TrainConfig) -> None:
    """Refuse any value that cannot work, section by section, before a model is built."""
    for check in (_validate_video, _validate_backbone, _validate_sampler, _validate_frames, _validate_lora,
                  _validate_reward, _validate_optim, _validate_prompts, _validate_validation,
                  _validate_memory, _validate_kernels, _validate_speed, _validate_train, _validate_guards,
                  _validate_safeguards, _validate_logging):
        check(cfg)


def _validate_video(cfg: TrainConfig) -> None:
    for name in ("frames", "height", "width", "fps"):
        _positive(f"video.{name}", getattr(cfg.video, name))


def _validate_backbone(cfg: TrainConfig) -> None:
    from fastvader.backbones import available_backbones, backbone_class

    v = cfg.video
    _choice("backbone.name", cfg.backbone.name, available_backbones())
    _choice("backbone.dtype", cfg.backbone.dtype, ["auto", "fp32", "bf16", "fp16"])
    if cfg.backbone.config_path and not cfg.backbone.random_init:
        raise _err("backbone.config_path", cfg.backbone.config_path, "only used with backbone.random_init=true")
    try:
        backbone_class(cfg.backbone.name).check_video_size(v.frames, v.height, v.width)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None


def _validate_sampler(cfg: TrainConfig) -> None:
    s = cfg.sampler
    _choice("sampler.name", s.name, ["ddim", "dpm++", "euler", "euler_flow"])
    _positive("sampler.steps", s.steps)
    if not 0.0 <= s.eta <= 1.0:
        raise _err("sampler.eta", s.eta, "must be in [0, 1]")
    _positive("sampler.guidance_scale", s.guidance_scale, allow_zero=True)
    if parse_truncation(s.truncation, s.steps)[0] == "x0" and s.name not in ("ddim", "euler"):
        raise _err("sampler.truncation", s.truncation, f"x0:A-B needs a sampler that predicts the clean latents "
                   f"at every step (ddim or euler), not sampler.name={s.name}")


def _validate_frames(cfg: TrainConfig) -> None:
    parse_frame_spec(cfg.frames.reward, cfg.video.frames, "frames.reward")
    if cfg.frames.reward == "same":
        raise _err("frames.reward", "same", "'same' is only for frames.grad")
    parse_frame_spec(cfg.frames.grad, cfg.video.frames, "frames.grad")
    _validate_grad_within_reward(cfg.frames, cfg.video.frames)


def _validate_grad_within_reward(frames: FramesConfig, num_frames: int) -> None:
    """frames.grad picks out of the frames the reward sees: it must be able to pick there."""
    mode, arg = parse_frame_spec(frames.reward, num_frames, "frames.reward")
    chosen = None  # a random pick: known only per video
    if mode != "random":
        chosen = arg if mode == "list" else list(range(0, num_frames, arg if mode == "stride" else 1))
    count = arg if mode == "random" else len(chosen)
    grad_mode, grad_arg = parse_frame_spec(frames.grad, num_frames, "frames.grad")
    if grad_mode == "random" and grad_arg > count:
        raise _err("frames.grad", frames.grad, f"it asks for {grad_arg} frames, but frames.reward={frames.reward!r} "
                                               f"gives the reward {count}; frames.grad picks out of those")
    if grad_mode == "list" and chosen is None:
        raise _err("frames.grad", frames.grad, f"a list cannot be checked against frames.reward={frames.reward!r} "
                                               "(a random pick per video): use frames.grad=random:K or same")
    if grad_mode == "list" and not set(grad_arg) <= set(chosen):
        outside = sorted(set(grad_arg) - set(chosen))
        raise _err("frames.grad", frames.grad, f"frames {outside} are not among the frames the reward sees "
                                               f"({chosen}, frames.reward={frames.reward!r}); frames.grad picks "
                                               "out of those")


def _validate_lora(cfg: TrainConfig) -> None:
    lo = cfg.lora
    _positive("lora.rank", lo.rank)
    _positive("lora.alpha", lo.alpha)
    if not 0.0 <= lo.dropout < 1.0:
        raise _err("lora.dropout", lo.dropout, "must be in [0, 1)")
    if lo.init_from is not None and not Path(lo.init_from).is_file():
        raise _err("lora.init_from", lo.init_from, "the file does not exist (give a LoRA .safetensors file, e.g. "
                                                   "runs/<name>/lora.safetensors)")


def _validate_reward(cfg: TrainConfig) -> None:
    from fastvader.rewards import available_rewards, expand_terms

    r = cfg.reward
    if not r.terms and not r.name:
        raise _err("reward.name", r.name, "name a reward or give reward.terms")
    known = available_rewards()
    for name, weight in cfg.reward_terms.items():
        if name not in known:
            raise _err("reward.terms" if r.terms else "reward.name", name, f"choose from {known}")
        if not isinstance(weight, (int, float)):
            raise _err(f"reward.terms.{name}", weight, "weights are numbers")
    in_use = expand_terms(cfg.reward_terms)  # presets expand to the rewards they combine
    for name in r.options:
        if name not in in_use:
            field_name = "reward.terms" if r.terms else "reward.name"
            in_use_text = list(in_use) if r.terms else repr(r.name)
            raise ConfigError(f"config: reward.options.{name} is set, but {field_name}={in_use_text} does not use "
                              f"{name}: drop its options (--set reward.options={{}}) or use {name}")


def _validate_optim(cfg: TrainConfig) -> None:
    o = cfg.optim
    _choice("optim.name", o.name, ["adamw", "adamw8bit", "paged_adamw8bit"])
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.grad_accum", o.grad_accum)
    _positive("optim.max_grad_norm", o.max_grad_norm, allow_zero=True)
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        raise _err("optim.betas", o.betas, "two numbers in [0, 1)")


def _validate_prompts(cfg: TrainConfig) -> None:
    p = cfg.prompts
    sources = sum(bool(x) for x in (p.items, p.file, p.template))
    if sources == 0:
        raise _err("prompts", "(none)", "give prompts.items, prompts.file or prompts.template")
    if sources > 1:
        raise _err("prompts", "(several)", "give only one of prompts.items, prompts.file, prompts.template")
    if p.file and not Path(p.file).is_file():
        raise _err("prompts.file", p.file, "the file does not exist")
    if p.file and not prompt_lines(Path(p.file).read_text(errors="replace")):
        raise _err("prompts.file", p.file, "the file holds no prompt (one a line; blank lines and # comments "
                                           "are skipped)")
    if p.template:
        slots = re.findall(r"<(\w+)>", p.template)
        if not slots:
            raise _err("prompts.template", p.template, "use <slot> markers, e.g. '<animal> <activity>'")
        missing = [s for s in slots if not p.vocab.get(s)]
        if missing:
            raise _err("prompts.vocab", p.vocab, f"needs a non-empty list for each slot: {missing}")
    _choice("prompts.image_resize", p.image_resize, ["stretch", "crop"])
    from fastvader.training.prompts import check_conditioning

    check_conditioning(cfg)  # every entry's image against the backbone, before any model is built


def prompt_lines(text: str) -> list[str]:
    """The prompts of a prompts file: one a line, blank lines and ``#`` comments skipped."""
    lines = (ln.strip() for ln in text.splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _validate_validation(cfg: TrainConfig) -> None:
    va = cfg.validation
    _positive("validation.every", va.every, allow_zero=True)
    if not va.seeds or not all(isinstance(x, int) for x in va.seeds):
        raise _err("validation.seeds", va.seeds, "a non-empty list of integers")


def _validate_memory(cfg: TrainConfig) -> None:
    m = cfg.memory
    _choice("memory.checkpointing", m.checkpointing, ["none", "block", "sub_block", "step"])
    _positive("memory.decode_chunk", m.decode_chunk)
    _choice("memory.frozen_placement", m.frozen_placement, ["resident", "on_demand"])
    if m.gpu_memory is not None:
        parse_bytes(m.gpu_memory, "memory.gpu_memory")
    _choice("memory.zero_stage", m.zero_stage, [0, 2, 3])
    _choice("memory.zero_offload", m.zero_offload, ["none", "optimizer", "optimizer+params"])
    if m.zero_offload != "none" and m.zero_stage == 0:
        raise _err("memory.zero_offload", m.zero_offload, "offload is a ZeRO feature: set memory.zero_stage=2 or 3")
    if m.zero_offload == "optimizer+params" and m.zero_stage != 3:
        raise _err("memory.zero_offload", m.zero_offload, "parameter offload needs memory.zero_stage=3")
    _validate_frozen_weights(cfg)
    if m.zero_stage and cfg.optim.name != "adamw":
        raise _err("optim.name", cfg.optim.name,
                   f"a bitsandbytes optimizer cannot run under DeepSpeed ZeRO (memory.zero_stage={m.zero_stage}): "
                   "DeepSpeed raises for it with ZeRO offload and does not partition its 8-bit states; "
                   "use optim.name=adamw with ZeRO, or memory.zero_stage=0 to keep the 8-bit optimizer")


def _validate_frozen_weights(cfg: TrainConfig) -> None:
    """memory.fp8_weights, fp8_keep_bf16 and block_swap (docs/memory.md)."""
    m = cfg.memory
    if not all(isinstance(p, str) for p in m.fp8_keep_bf16):
        raise _err("memory.fp8_keep_bf16", m.fp8_keep_bf16, "a list of module-name patterns such as '*.ffn.*'")
    count = m.block_swap
    if count != "auto" and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise _err("memory.block_swap", count, "0, a number of transformer blocks, or auto")
    if count == "auto" and not m.gpu_memory and cfg.train.device == "cpu":
        raise _err("memory.block_swap", count, "auto plans for a GPU's memory: set memory.gpu_memory, or a number")


def _validate_kernels(cfg: TrainConfig) -> None:
    _choice("kernels.enabled", switch_word(cfg.kernels.enabled), SWITCH_VALUES)


def _validate_speed(cfg: TrainConfig) -> None:
    check_speed(cfg.speed, cfg.memory.checkpointing)


def check_speed(s: SpeedConfig, checkpointing: str = "none") -> None:
    """The ``speed`` section on its own (``fastvader.accelerate_pipeline`` takes one)."""
    _choice("speed.compile", switch_word(s.compile), COMPILE_MODES)
    _choice("speed.cuda_graphs", switch_word(s.cuda_graphs), SWITCH_VALUES)
    _choice("speed.channels_last", switch_word(s.channels_last), SWITCH_VALUES)
    if not s.compile_backend:
        raise _err("speed.compile_backend", s.compile_backend, "name a torch.compile backend (inductor)")
    if s.compile_grad_steps and switch_word(s.compile) == "off":
        raise _err("speed.compile_grad_steps", True, "needs speed.compile=auto, regional or full")
    if s.compile_grad_steps and switch_word(s.compile) == "full" and checkpointing != "none":
        raise _err("speed.compile_grad_steps", True,
                   f"a full compile cannot trace the grad steps through memory.checkpointing="
                   f"{checkpointing!r} (its wrappers count calls in Python): use speed.compile=regional, "
                   "whose blocks run compiled inside the checkpoint wrappers, or memory.checkpointing=none")


def _validate_train(cfg: TrainConfig) -> None:
    t = cfg.train
    _positive("train.steps", t.steps)
    _positive("train.batch_size", t.batch_size)
    _choice("train.precision", t.precision, ["auto", "fp32", "bf16", "fp16"])
    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", t.device):
        raise _err("train.device", t.device, "auto, cpu, cuda or cuda:N")
    _positive("train.checkpoint_every", t.checkpoint_every, allow_zero=True)
    _positive("train.checkpoint_minutes", t.checkpoint_minutes, allow_zero=True)
    _positive("train.keep_checkpoints", t.keep_checkpoints, allow_zero=True)
    _positive("train.cpu_threads", t.cpu_threads, allow_zero=True)
    if not t.run_name or t.run_name in (".", "..") or re.search(r"[/\\\x00]", t.run_name):
        raise _err("train.run_name", t.run_name, "one folder name: no '/' or '\\', not '.' or '..'")


def _validate_guards(cfg: TrainConfig) -> None:
    """docs/trust.md. fp16 on a family that ships in bf16 is refused, or only warned about when
    the user forces it."""
    from fastvader.monitoring.guards import fp16_risk

    g = cfg.guards
    _positive("guards.max_bad_steps", g.max_bad_steps)
    _positive("guards.reward_window", g.reward_window)
    for name in ("min_grad_norm", "min_lora_change", "min_reward_change"):
        _positive(f"guards.{name}", getattr(g, name), allow_zero=True)
    risk = fp16_risk(cfg.backbone.name, cfg.train.precision, cfg.backbone.dtype)
    if risk and not g.allow_fp16:
        raise ConfigError(f"config: {risk}, or set guards.allow_fp16=true to force fp16.")
    if risk:
        warnings.warn(f"fastvader: {risk}; forced by guards.allow_fp16=true.", stacklevel=2)


def _validate_safeguards(cfg: TrainConfig) -> None:
    """docs/trust.md."""
    from fastvader.rewards import available_rewards

    s = cfg.safeguards
    if s.second_reward is not None and s.second_reward not in available_rewards():
        raise _err("safeguards.second_reward", s.second_reward, f"choose from {available_rewards()}")
    if s.second_reward_options and s.second_reward is None:
        raise _err("safeguards.second_reward_options", s.second_reward_options, "set safeguards.second_reward too")
    _positive("safeguards.early_stop_patience", s.early_stop_patience, allow_zero=True)
    _positive("safeguards.early_stop_min_delta", s.early_stop_min_delta, allow_zero=True)
    if s.second_reward_max_drop is not None:
        _positive("safeguards.second_reward_max_drop", s.second_reward_max_drop, allow_zero=True)
        if s.second_reward is None:
            raise _err("safeguards.second_reward_max_drop", s.second_reward_max_drop,
                       "needs safeguards.second_reward (the reward whose fall stops the run)")
    if (s.early_stop_patience or s.second_reward_max_drop is not None) and not cfg.validation.every:
        raise _err("validation.every", cfg.validation.every,
                   "early stopping scores the held-out prompts every N steps: set validation.every > 0")
    _choice("safeguards.regularizer", s.regularizer, ["none", "denoiser"])
    _positive("safeguards.regularizer_weight", s.regularizer_weight, allow_zero=True)
    if s.regularizer != "none" and s.regularizer_weight == 0:
        raise _err("safeguards.regularizer_weight", 0.0, f"set a weight > 0 for regularizer={s.regularizer!r}")


def _validate_logging(cfg: TrainConfig) -> None:
    if cfg.logging.wandb_mode is not None:
        _choice("logging.wandb_mode", cfg.logging.wandb_mode, ["online", "offline", "disabled"])


_UNITS = {"": 2**30, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int, field_name: str = "size") -> int:
    """'24GiB' -> 25769803776. A string without a unit ('24') and single-letter units ('24G', as
    in Docker) are binary: GiB, MiB, KiB. An int is a count of bytes."""
    if isinstance(text, int):
        return text
    m = re.match(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise _err(field_name, text, "a size such as 24GiB, 24G, 22.5GB or 8000MiB (a bare number means GiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise _err(field_name, text, "a size above zero, such as 24GiB")
    return size
