"""Moved to ``fused.processors.unet`` (this path stays for one release)."""
from ._moved import alias

alias(__name__, "fused.processors.unet")
