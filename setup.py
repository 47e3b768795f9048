"""Packaging: two packages, ``fused`` and ``vico``.

``csrc/`` ships inside the wheel as the package-data folder ``fused/csrc`` so
that an installed copy can JIT-build its C++/CUDA kernels without the
checkout (fused/_cpp.py looks there first, then beside the package).
"""

from setuptools import find_packages, setup

setup(
    name="fused-attn-maps",
    version="0.1.0",
    description="Fused attention maps, in-kernel Otsu masks and key-masked attention for "
    "attention-map-driven personalization of diffusion models (ViCo, AttnDreamBooth, CatVersion)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # every subpackage (vico.methods, vico.toyworld, ...): a non-editable install needs them all
    packages=find_packages(include=["fused", "fused.*", "vico", "vico.*"]) + ["fused.csrc"],
    package_dir={"fused.csrc": "csrc"},
    package_data={"fused.csrc": ["*.cpp", "*.h", "*.cu"],
                  "vico": ["prompts/*.txt", "toyworld/model/*.json", "toyworld/model/*/*",
                           "toyworld/model_sdxl/*.json", "toyworld/model_sdxl/*/*"]},
    include_package_data=False,
    # Floors are the versions this project was tested with (see docs/install.md).
    install_requires=[
        "torch>=2.13",
        "numpy>=2.0",
        "ninja>=1.11",
        "pybind11>=2.12",
        "safetensors>=0.4",
        "diffusers>=0.42",
        "peft>=0.17",  # AttnDreamBooth's --unet-lora-rank (diffusers' LoRA loading needs it too)
        "transformers>=5.0",
        "accelerate>=1.0",
        "pillow>=10",
        "tqdm>=4.60",
        'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    entry_points={"console_scripts": ["vico = vico.cli:main"]},
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=5",
            "scikit-image>=0.24",
            "hypothesis>=6",
            "setuptools>=69",  # tests build a wheel
            "ruff>=0.5",  # tests/project/test_lint.py
            "tensorboard>=2.14",  # vico train --report-to tensorboard, read back by the tests
        ],
    },
)
