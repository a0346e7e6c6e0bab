"""fastvader: reward-gradient alignment of text-to-video diffusion models (VADER), lean and fast.

Public API::

    from fastvader import TrainConfig, load_config, train, apply, revert, load_lora
    from fastvader import accelerate_pipeline, revert_pipeline   # a diffusers pipeline, faster
"""
from fastvader.config import ConfigError, TrainConfig, load_config
from fastvader.console import quiet_third_party_noise
from fastvader.errors import UserError
from fastvader.patching import apply, revert

__version__ = "0.1.0"

quiet_third_party_noise()  # bitsandbytes' failed-probe line on every import of peft or diffusers


def accelerate_pipeline(pipe, **settings):
    """Kernels and speed settings on a diffusers pipeline; see :mod:`fastvader.patching.pipelines`."""
    from fastvader.patching.pipelines import accelerate_pipeline as _accelerate

    return _accelerate(pipe, **settings)


def revert_pipeline(pipe) -> bool:
    """Undo :func:`accelerate_pipeline` exactly."""
    from fastvader.patching.pipelines import revert_pipeline as _revert

    return _revert(pipe)


def train(config: TrainConfig, **kwargs):
    """Run the training loop; see :func:`fastvader.training.trainer.train`."""
    from fastvader.training.trainer import train as _train

    return _train(config, **kwargs)


def load_lora(pipe_or_model, path, **kwargs):
    """Load a LoRA file (fastvader, diffusers, kohya or ComfyUI layout) into a diffusers pipeline,
    model or fastvader backbone; see :func:`fastvader.lora.load_lora`. ``.remove()`` undoes it."""
    from fastvader.lora import load_lora as _load_lora

    return _load_lora(pipe_or_model, path, **kwargs)


__all__ = ["TrainConfig", "ConfigError", "UserError", "load_config", "train", "load_lora", "apply", "revert",
           "accelerate_pipeline", "revert_pipeline", "__version__"]
