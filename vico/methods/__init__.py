"""Personalization methods on one interface (``base.Method``)."""

from .base import Method, available_methods, get_method

__all__ = ["Method", "available_methods", "get_method"]
