"""vico: attention-map-driven personalization (ViCo, AttnDreamBooth, CatVersion) on ``fused``.

The method layer is being built (see the project's issues); the kernels it
uses live in the ``fused`` package.
"""

__version__ = "0.1.0"
