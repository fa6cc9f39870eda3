"""Registers the paper's methods (Gogineni & Nadimi, Algorithms 1–3) and the Retrain/FT references.

Importing this module registers ``amnesiac``, ``partial_amnesiac``, ``label_flip``, ``partial_label_flip``,
``optimization``, ``partial_optimization``, ``retrain`` and ``finetune`` with :func:`.base.register_method`.
"""
from .amnesiac import NaiveAmnesiac, PartialAmnesiac
from .gradient_ascent import OBJECTIVES, Optimization, PartialOptimization
from .label_flip import FlippedLabels, LabelFlip, PartialLabelFlip
from .reference_methods import Finetune, Retrain

__all__ = ["NaiveAmnesiac", "PartialAmnesiac", "LabelFlip", "PartialLabelFlip", "FlippedLabels", "Optimization",
           "PartialOptimization", "OBJECTIVES", "Retrain", "Finetune"]
