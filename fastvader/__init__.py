"""fastvader: reward-gradient alignment of text-to-video diffusion models (VADER), lean and fast.

Public API::

    from fastvader import TrainConfig, load_config, train, apply, revert
"""
from fastvader.config import ConfigError, TrainConfig, load_config
from fastvader.patching import apply, revert

__version__ = "0.1.0"


def train(config: TrainConfig, **kwargs):
    """Run the training loop; see :func:`fastvader.training.trainer.train`."""
    from fastvader.training.trainer import train as _train

    return _train(config, **kwargs)


__all__ = ["TrainConfig", "ConfigError", "load_config", "train", "apply", "revert", "__version__"]
