"""Registers the neighbouring systems' methods (SPEC §4): Deep Unlearn's baselines, certified unlearning
(Zhang et al.) and SFR-on (Huang et al.). Importing this module is what makes their names available."""
from . import certified, deep_unlearn, sfron  # noqa: F401
