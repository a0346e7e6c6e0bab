"""fastvader: reward-gradient alignment of text-to-video diffusion models (VADER), lean and fast.

Public API::

    from fastvader import TrainConfig, load_config, train, apply, revert
    from fastvader import accelerate_pipeline, revert_pipeline   # a diffusers pipeline, faster
"""
from fastvader.config import ConfigError, TrainConfig, load_config
from fastvader.patching import apply, revert

__version__ = "0.1.0"


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


__all__ = ["TrainConfig", "ConfigError", "load_config", "train", "apply", "revert", "accelerate_pipeline",
           "revert_pipeline", "__version__"]
