"""vico: attention-map-driven personalization (ViCo, AttnDreamBooth, CatVersion
and Textual Inversion; ``vico.methods``) on the fused ops of the ``fused`` package.

Importing ``vico`` does not import diffusers; the functions that need it
import it when called.
"""

from .image_attention import ImageCrossAttention, default_image_attention_layers, inject_image_attention

__version__ = "0.1.0"

__all__ = ["ImageCrossAttention", "default_image_attention_layers", "inject_image_attention"]
