"""Packed export of a quantized model and its bit-exact reload.

``DIR/model.safetensors`` holds every quantized layer's packed QTensor bytes (``<layer>.qweight``, uint8)
and every other tensor of the model's state dict (biases, norms, embeddings kept in float, calibrated
activation ranges); the header metadata records each quantized layer's format, shape and class, the model
name and the recipe, and a SHA-256 of every tensor and of the metadata (:mod:`numcast.io`): identical runs
write identical bytes, and a damaged or altered file is refused naming the tensor. Tied tensors (a shared
embedding / LM head) are stored once. ``DIR/recipe.yaml`` is the recipe. Reloading rebuilds the same modules
from the float model and these bytes, so the quantized weights are bit-identical; a truncated or foreign file
raises an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from numcast.formats.qtensor import QTensor
from numcast.formats.spec import Format
from numcast.io import load_safetensors, save_safetensors
from numcast.nn.convert import make_quantizable
from numcast.nn.modules import QuantWeightModule
from numcast.nn.surgery import set_module
from numcast.pipeline.offload import disk_offload_of
from numcast.pipeline.plan import make_quant_module, plan_layers
from numcast.pipeline.recipe import Recipe

MODEL_FILE = "model.safetensors"


def save_quantized(model: nn.Module, out_dir: Path, model_name: str, recipe: Recipe) -> Path:
    """Write ``out_dir/model.safetensors`` (see module docstring); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    state = _read_in(model, tensors, layers)
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in state.items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().clone()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    meta = {
        "numcast_model": model_name,
        "numcast_dtype": str(dtype).removeprefix("torch."),
        "numcast_recipe": recipe.model_dump_json(),
        "numcast_layers": json.dumps(layers, sort_keys=True),
        "numcast_aliases": json.dumps(aliases, sort_keys=True),
    }
    return save_safetensors(tensors, out_dir / MODEL_FILE, meta)


def _read_in(model: nn.Module, tensors: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Put every quantized layer's packed bytes into ``tensors`` and its record into ``layers``; return the model's
    state dict. With disk offload (:mod:`numcast.pipeline.offload`) each offloaded block is read in once, its
    layers packed and its tensors cloned in place of their meta tensors, one block at a time."""
    state = model.state_dict()
    disk = disk_offload_of(model)
    inside: set[int] = set()
    for prefix, block in disk.blocks() if disk is not None else ():
        inside |= {id(m) for m in block.modules()}
        with disk.materialize(block):
            _pack(block, prefix, tensors, layers)
            state.update({f"{prefix}.{k}": v.detach().clone() for k, v in block.state_dict().items()})
    _pack(model, "", tensors, layers, skip=inside)
    return state


def _pack(root: nn.Module, prefix: str, tensors: dict, layers: dict, skip: set[int] = frozenset()) -> None:
    for name, m in root.named_modules():
        if isinstance(m, QuantWeightModule) and id(m) not in skip:
            full = ".".join(p for p in (prefix, name) if p)
            qt = m.qweight
            tensors[f"{full}.qweight"] = torch.frombuffer(bytearray(qt.pack()), dtype=torch.uint8)
            layers[full] = {"format": qt.format.to_json(), "shape": list(qt.shape), "class": type(m).__name__}


def read_metadata(path: Path) -> tuple[str, Recipe]:
    """(model name, recipe) of a packed model file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta["numcast_model"], Recipe.model_validate_json(meta["numcast_recipe"])
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a numcast packed model ({exc})") from exc
    except Exception as exc:  # safetensors' own header errors
        raise ValueError(f"{path}: unreadable packed model ({exc})") from exc


def read_dtype(path: Path) -> str:
    """The dtype the packed model's float model was loaded in (``float32`` for files that do not say)."""
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("numcast_dtype", "float32")


def load_quantized(model: nn.Module, path: Path) -> nn.Module:
    """Turn the float ``model`` (freshly loaded, same architecture) into the saved quantized model, in place."""
    tensors, meta = load_safetensors(path, "numcast packed model")  # checksums verified: names a damaged tensor
    try:
        layers = json.loads(meta["numcast_layers"])
        aliases = json.loads(meta["numcast_aliases"])
        recipe = Recipe.model_validate_json(meta["numcast_recipe"])
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise ValueError(f"{path}: unreadable or not a numcast packed model ({exc})") from exc
    make_quantizable(model)
    plans = {p.name: p for p in plan_layers(model, recipe) if p.quantized}
    for name, info in layers.items():
        if name not in plans:
            raise ValueError(f"{path}: layer {name!r} is not a quantizable layer of this model")
        fmt = Format.from_json(info["format"])
        data = tensors.pop(f"{name}.qweight").numpy().tobytes()
        try:
            qt = QTensor.unpack(data, fmt, tuple(info["shape"]))
        except ValueError as exc:
            raise ValueError(f"{path}: layer {name}: {exc}") from exc
        plan = plans[name]
        plan.weight_format = fmt
        set_module(model, name, make_quant_module(plan, recipe, qweight=qt))
    for k, src in aliases.items():
        tensors[k] = tensors[src]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"{path}: tensors the model does not have: {unexpected[:5]}")
    if missing:
        raise ValueError(f"{path}: tensors missing from the file: {missing[:5]}")
    return model.eval()
