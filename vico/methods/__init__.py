"""Personalization methods on one interface (``base.Method``), by name (``registry``)."""

from .base import Method
from .registry import available_methods, get_method, load_method

__all__ = ["Method", "available_methods", "get_method", "load_method"]
