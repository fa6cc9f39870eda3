"""Unlearning methods: the paper's (Gogineni & Nadimi) and the field's baselines, on one API."""
from .base import Method, UnlearnResult, available_methods, get_method, register_method, unlearn
from . import neighbours  # noqa: F401
from . import paper  # noqa: F401

__all__ = ["Method", "UnlearnResult", "available_methods", "get_method", "register_method", "unlearn"]
