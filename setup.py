# The Triton kernels live in kernels/ at the repository root but install as fastvader.kernels:
# a top-level module named `kernels` would shadow Hugging Face's `kernels` package, which
# bitsandbytes and diffusers import by that name.
from setuptools import find_packages, setup

packages = find_packages(include=["fastvader", "fastvader.*"]) + ["fastvader.kernels", "fastvader.kernels.ops"]

setup(
    packages=packages,
    package_dir={"fastvader.kernels": "kernels"},
    # the toy world's weights and the real model configs (JSON/YAML, each folder with its
    # SOURCES.md); training logs are documentation (docs/toy_world/), not package data
    package_data={"fastvader": ["toy/weights/*.safetensors", "toy/weights/world.json",
                                "model_configs/*.md", "model_configs/*.yaml",
                                "model_configs/*/*.json", "model_configs/*/*.md"]},
    include_package_data=True,
)
