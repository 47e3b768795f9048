"""The methods by name, and rebuilding a trained one from its concept folder.

Kept apart from ``base`` (the interface every method implements): the method
modules import ``base``, the registry imports the method modules, and ``base``
needs none of them.
"""

from __future__ import annotations

from pathlib import Path

from ..model import Components, UserError
from .attndreambooth import AttnDreamBooth
from .base import CONFIG_FILE, WEIGHTS_FILE, Method, MethodConfig, load_weights, read_concept
from .catversion import CatVersion
from .textual_inversion import TextualInversion
from .vico import ViCo

METHODS: dict[str, type[Method]] = {m.name: m for m in (ViCo, TextualInversion, AttnDreamBooth, CatVersion)}


def available_methods() -> dict[str, type[Method]]:
    """Method classes by their ``name`` (the ``--method`` choices), ViCo first."""
    return dict(METHODS)


def get_method(name: str) -> type[Method]:
    """The method class called ``name``; a one-line ``UserError`` listing the choices otherwise."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def load_method(components: Components, concept_dir: str | Path) -> Method:
    """Rebuild a trained method on ``components`` from a saved concept folder."""
    meta, weights = read_concept(concept_dir)
    cls = get_method(meta["method"])
    options = cls.Options.from_saved(meta["config"].get("options", {}), Path(concept_dir) / CONFIG_FILE, cls.name)
    method = cls(components, MethodConfig(**{**meta["config"], "options": options}))
    load_weights(method, weights, Path(concept_dir) / WEIGHTS_FILE)
    return method
