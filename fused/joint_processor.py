"""Moved to ``fused.processors.joint`` (this path stays for one release)."""
from ._moved import alias

alias(__name__, "fused.processors.joint")
