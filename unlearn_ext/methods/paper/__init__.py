"""The paper's methods (Gogineni & Nadimi, Algorithms 1–3), one module each.

Importing this package registers ``amnesiac``, ``partial_amnesiac`` (:mod:`.amnesiac`), ``label_flip``,
``partial_label_flip`` (:mod:`.label_flip`), ``optimization`` and ``partial_optimization``
(:mod:`.optimization`) with :func:`..base.register_method`.
"""
from .amnesiac import NaiveAmnesiac, PartialAmnesiac
from .label_flip import FlippedLabels, LabelFlip, PartialLabelFlip
from .optimization import OBJECTIVES, Optimization, PartialOptimization

__all__ = ["NaiveAmnesiac", "PartialAmnesiac", "LabelFlip", "PartialLabelFlip", "FlippedLabels", "Optimization",
           "PartialOptimization", "OBJECTIVES"]
