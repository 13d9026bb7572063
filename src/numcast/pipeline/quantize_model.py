"""``quantize_model``: the one call from Python (the ``quantize_(model, config)`` habit): a model, a format name
or a :class:`~numcast.pipeline.recipe.Recipe`, calibration batches; the model is changed in place and the result
says what happened to every layer.

Methods that need no data (RTN, EP-init) run layer by layer (:func:`numcast.pipeline.data_free.quantize_data_free`);
the others block by block (:func:`numcast.pipeline.runner.quantize_blockwise`) over ``blocks="auto"``
(:func:`numcast.pipeline.blocks.find_blocks`) or the blocks you pass. Block inputs always come from the model's
own forward (:mod:`numcast.pipeline.block_inputs`), so code between blocks runs as written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from numcast.formats.spec import Format
from numcast.pipeline.blocks import find_blocks
from numcast.pipeline.data_free import quantize_data_free
from numcast.pipeline.export import save_quantized
from numcast.pipeline.plan import QuantizationResult
from numcast.pipeline.recipe import Recipe
from numcast.pipeline.runner import Placement, quantize_blockwise


def count_samples(batches: list) -> int:
    """Calibration samples in ``batches`` (the leading dimension of each batch's first tensor)."""

    def first_tensor(obj):
        if isinstance(obj, torch.Tensor):
            return obj
        values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
        return next((t for t in map(first_tensor, values) if t is not None), None)

    return sum(t.shape[0] if (t := first_tensor(b)) is not None and t.dim() else 1 for b in batches)


def make_recipe(recipe_or_format: Recipe | str | Format, method: str | None = None, **fields) -> Recipe:
    """A recipe from a format name (or Format) and recipe fields, or a recipe with ``method``/``fields`` applied."""
    if isinstance(recipe_or_format, Recipe):
        data = recipe_or_format.model_dump()
    elif isinstance(recipe_or_format, (str, Format)):
        fmt = recipe_or_format
        if isinstance(fmt, Format):
            if not fmt.name:
                raise ValueError("a Format passed to quantize_model needs a name: register it first "
                                 "(numcast.register_format)")  # fmt: skip
            fmt = fmt.name
        data = {"weights": fmt}
    else:
        raise TypeError(f"quantize_model takes a format name or a Recipe, got {type(recipe_or_format).__name__}")
    if method is not None:
        data["method"] = method
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Recipe.model_validate(data)


def quantize_model(
    model: nn.Module,
    recipe_or_format: Recipe | str | Format,
    calibration: Iterable | None = None,
    *,
    method: str | None = None,
    blocks: str | Sequence[nn.Module] = "auto",
    progress: bool = False,
    placement: Placement | None = None,
    **recipe_fields,
) -> QuantizationResult:
    """Quantize ``model`` in place and say what happened to every layer.

    ``recipe_or_format``: a format name (``"mxfp4"``) or a Recipe; ``method`` and ``recipe_fields`` (any Recipe
    field: ``activations="mxfp8_e4m3"``, ``exclude=["lm_head"]``, ``gptq={"damp": 0.05}``, ...) override it.
    ``calibration``: the model's inputs, one batch each (tensors, tuples of positional arguments, or dicts of
    keyword arguments such as a tokenizer's output); needed by every method but RTN/EP-init and by static
    activation scales. ``blocks``: ``"auto"`` or the model's blocks in execution order. The result's ``recipe``
    replays the run (``recipe.save("recipe.yaml")``); the packed form is written by
    :func:`numcast.pipeline.export.save_quantized`, which a Hugging Face model's ``save_pretrained`` now calls.
    """
    batches = list(calibration) if calibration is not None else []
    if batches:
        recipe_fields.setdefault("calibration", count_samples(batches))
    recipe = make_recipe(recipe_or_format, method, **recipe_fields)
    solver = recipe.make_method()
    if not solver.needs_calibration:
        return _packed_save_pretrained(quantize_data_free(model, recipe, batches, inplace=True))
    if not batches:
        raise ValueError(f"method {recipe.method!r} learns from calibration data: pass calibration=[batch, ...] "
                         "(the model's inputs)")  # fmt: skip
    if isinstance(blocks, str):
        if blocks != "auto":
            raise ValueError(f"blocks is 'auto' or a list of the model's blocks, got {blocks!r}")
        with torch.no_grad():
            blocks = find_blocks(model, (placement or Placement()).compute(batches[0]))
    res = quantize_blockwise(model, list(blocks), batches, recipe, progress=progress, placement=placement)
    return _packed_save_pretrained(res)


def _packed_save_pretrained(res: QuantizationResult) -> QuantizationResult:
    """A Hugging Face model's ``save_pretrained`` would write a checkpoint without the quantized layers' weights
    (they are packed codes, not parameters), which ``from_pretrained`` then fills with random values. On the
    quantized model it writes numcast's packed form instead (``model.safetensors`` with checksums and
    ``recipe.yaml``, :func:`numcast.pipeline.export.save_quantized`; no ``config.json``, so ``from_pretrained``
    refuses the folder rather than loading garbage); reload with :func:`numcast.pipeline.export.load_quantized`
    onto the float model."""
    model = res.model
    if not callable(getattr(model, "save_pretrained", None)):
        return res
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)

    def save_pretrained(save_directory, *args, **kwargs) -> None:
        out = Path(save_directory)
        save_quantized(model, out, name, res.recipe)
        res.recipe.save(out / "recipe.yaml", overwrite=True)

    model.save_pretrained = save_pretrained
    return res
