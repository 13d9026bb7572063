"""Recipes (validated configs) and the layer-wise calibration runner."""

from numcast.pipeline.recipe import LayerOverride, Recipe

__all__ = ["LayerOverride", "Recipe"]
