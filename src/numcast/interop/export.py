"""Models out: one table of exporters (GGUF, compressed-tensors, QONNX) and the call that runs one.

An exporter writes numcast's own codes and scales into a target's layout, never re-quantizing: the exported
weights are the weights numcast evaluated. It is registered with :func:`register_exporter` and called by
:func:`export_model` with an :class:`ExportSource` (the quantized model and where it came from) and a
temporary path beside the requested one; :func:`export_model` renames that path over ``out`` only when the
exporter succeeded (:mod:`numcast.io`: nothing half-written, nothing numcast did not write is replaced).

A layer the target cannot represent raises ``ValueError`` naming the layer and its format; with
``float_fallback`` the exporter writes it unquantized instead and lists it in :attr:`ExportResult.float_layers`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from numcast.interop.source import ExportResult, ExportSource, quantized_layers
from numcast.interop.to_compressed_tensors import write_compressed_tensors
from numcast.interop.to_gguf import write_gguf
from numcast.interop.to_qonnx import write_qonnx
from numcast.io import OutputDir, write_atomic

Writer = Callable[[ExportSource, Path, bool], ExportResult]


@dataclass(frozen=True)
class Exporter:
    """One export target: ``write(source, tmp_path, float_fallback)`` writes the file or folder ``tmp_path`` and
    returns the result (its ``path`` is ``tmp_path``; :func:`export_model` reports the final one). ``kind`` is
    ``"file"`` or ``"folder"``; ``suffix`` the file name's ending (``.gguf``, ``.onnx``); ``needs_inputs``: the
    writer traces the model on ``ExportSource.example_inputs``."""

    name: str
    kind: str
    suffix: str
    description: str
    write: Writer
    needs_inputs: bool = False


EXPORTERS: dict[str, Exporter] = {
    e.name: e
    for e in (
        Exporter("gguf", "file", ".gguf", "llama.cpp (GGUF: Q4_0, Q8_0, MXFP4, NVFP4)", write_gguf),
        Exporter("compressed-tensors", "folder", "", "vLLM / transformers (compressed-tensors checkpoint)",
                 write_compressed_tensors),
        Exporter("qonnx", "file", ".onnx", "FINN / hls4ml (QONNX: integer weights, activations, accumulators)",
                 write_qonnx, needs_inputs=True),
    )
}  # fmt: skip


def register_exporter(exporter: Exporter) -> Exporter:
    """Add an export target (the name must be new)."""
    if exporter.name in EXPORTERS:
        raise ValueError(f"exporter {exporter.name!r} is already registered")
    if exporter.kind not in ("file", "folder"):
        raise ValueError(f"exporter {exporter.name!r}: kind must be 'file' or 'folder', got {exporter.kind!r}")
    EXPORTERS[exporter.name] = exporter
    return exporter


def get_exporter(name: str) -> Exporter:
    """The registered exporter ``name``; ``ValueError`` listing the known ones (and the closest) otherwise."""
    if name not in EXPORTERS:
        close = difflib.get_close_matches(name, list(EXPORTERS), n=2, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown export target {name!r}{hint}; targets: {', '.join(EXPORTERS)}")
    return EXPORTERS[name]


def export_model(source: ExportSource, to: str, out: str | Path, *, float_fallback: bool = False,
                 overwrite: bool = False) -> ExportResult:  # fmt: skip
    """Export ``source`` to the target ``to`` at ``out`` (a file for GGUF/QONNX, a folder for
    compressed-tensors), atomically; an existing ``out`` is replaced only with ``overwrite`` (a folder only
    when numcast wrote it). Returns the :class:`ExportResult` with ``path = out``."""
    exporter = get_exporter(to)
    quantized_layers(source.model)
    out = Path(out).expanduser()
    if exporter.kind == "folder":
        with OutputDir(out, overwrite) as d:
            res = exporter.write(source, d.tmp, float_fallback)
    else:
        if out.is_dir():
            raise IsADirectoryError(f"{out} is a directory; {to} writes one file (e.g. {out}/model{exporter.suffix})")
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        holder: list[ExportResult] = []
        write_atomic(out, lambda tmp: holder.append(exporter.write(source, Path(tmp), float_fallback)))
        res = holder[0]
    res.path = out
    return res
