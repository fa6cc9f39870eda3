"""Unlearning methods on one API (:mod:`.base`): the paper's (:mod:`.paper`), the references every result is
read against (:mod:`.references`: Retrain, FT) and the neighbouring systems' baselines (:mod:`.baselines`,
one module per family). Importing this package registers all of them."""
from .base import Method, UnlearnResult, available_methods, get_method, register_method, unlearn, unregister_method
from . import baselines  # noqa: F401
from . import paper  # noqa: F401
from . import references  # noqa: F401

__all__ = ["Method", "UnlearnResult", "available_methods", "get_method", "register_method", "unlearn",
           "unregister_method"]
