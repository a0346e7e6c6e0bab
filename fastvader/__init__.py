"""fastvader: reward-gradient alignment of text-to-video diffusion models (VADER), lean and fast.

Public API::

    from fastvader import TrainConfig, load_config, train, apply, revert
"""
from ._compat import hide_repo_kernels_package

hide_repo_kernels_package()  # before anything imports transformers or diffusers

from .config import ConfigError  # noqa: E402, TrainConfig, load_config
from .patching import apply, revert  # noqa: E402

__version__ = "0.1.0"


def train(config: "TrainConfig", **kwargs):
    """Run the training loop; see :func:`fastvader.train_loop.train`."""
    from .train_loop import train as _train

    return _train(config, **kwargs)


__all__ = ["TrainConfig", "ConfigError", "load_config", "train", "apply", "revert", "__version__"]
