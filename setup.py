# The Triton kernels live in kernels/ at the repository root but install as fastvader.kernels:
# a top-level module named `kernels` would shadow Hugging Face's `kernels` package, which
# bitsandbytes and diffusers import by that name.
from setuptools import find_packages, setup

packages = find_packages(include=["fastvader", "fastvader.*"]) + ["fastvader.kernels", "fastvader.kernels.ops"]

setup(
    packages=packages,
    package_dir={"fastvader.kernels": "kernels"},
    package_data={"fastvader": ["toy/weights/*.safetensors", "toy/weights/*.json"]},
    include_package_data=True,
)
