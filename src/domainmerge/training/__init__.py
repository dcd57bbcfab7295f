"""domainmerge.training: phase 1 of the method, single-target self-training (:func:`adapt`)."""

from domainmerge.training.adapt import AdaptConfig, AdaptResult, adapt
from domainmerge.training.recipe import RECIPES, Recipe, get_recipe

__all__ = ["RECIPES", "AdaptConfig", "AdaptResult", "Recipe", "adapt", "get_recipe"]
