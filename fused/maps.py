"""``fused.maps`` is the public name of ``fused.processors.trace`` (token heat maps of a generation):
``with fused.maps.trace(pipe, prompt, words) as tr: ...``."""
from ._moved import alias

alias(__name__, "fused.processors.trace", deprecated=False)
