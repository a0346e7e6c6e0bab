"""Fast rollouts: the denoiser calls made without gradients at compiled, graph-captured speed.

:class:`SpeedPath` puts a config's ``speed`` settings on a denoiser: regional or full
torch.compile (:mod:`~fastvader.speed.compile`, blocks found by :mod:`~fastvader.speed.regions`),
CUDA graphs for the no-grad calls (:mod:`~fastvader.speed.graphs`), channels_last convolution
weights (:mod:`~fastvader.speed.layout`) and opt-in fp8 matmuls through torchao
(:mod:`~fastvader.speed.fp8`). :mod:`~fastvader.speed.profile` measures a run phase by phase
(``fastvader profile``). ``fastvader.accelerate_pipeline`` applies the same to a diffusers
pipeline. docs/speed.md says what each setting does and costs.
"""
from fastvader.speed.fast_path import Engagement, SpeedPath

__all__ = ["SpeedPath", "Engagement"]
