"""Block weights on disk: memory that does not grow with depth.

A model built on the meta device (``accelerate.init_empty_weights``) keeps only what lies outside its blocks
in memory (embeddings, final norm, head). :class:`DiskOffload` gives each block's tensors a home on disk and
hooks that bring them in for a forward and release them after:

- float tensors are read from the checkpoint's own safetensors files (``safe_open``, memory-mapped; each
  tensor copied into place with accelerate's ``set_module_tensor_to_device``) in the model's dtype;
- once the runner has solved a block, :meth:`DiskOffload.leave` *spills* its quantized layers: each QTensor
  is written to the spill folder (numcast's checksummed safetensors, :meth:`QTensor.save`) and the layer keeps
  only its activation quantizers; its hook reloads the QTensor and the cached float weight for a forward.

So a forward over the whole model (float or quantized evaluation, the runner's replays) holds one block at a
time, and the quantize phase holds one block, its float twin and the calibration activations of both
streams, whatever the depth. The runner pins the block it is solving (:meth:`enter`, loaded once, hooks
idle) and calls :meth:`leave` when the block is done. :meth:`materialize` brings one block in for code that
reads tensors outside a forward (the packed export). Deterministic: nothing is re-computed, tensors are read
back bit for bit.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from numcast.formats.qtensor import QTensor
from numcast.libc import glibc
from numcast.nn.modules import QuantWeightModule

ATTRIBUTE = "numcast_disk_offload"  # where a model loaded with its layers on disk keeps its DiskOffload


def disk_offload_of(model: nn.Module) -> DiskOffload | None:
    """The :class:`DiskOffload` of a model whose layers stay on disk, else None."""
    return getattr(model, ATTRIBUTE, None)


def available_memory() -> int:
    """Bytes of memory available now (``/proc/meminfo`` ``MemAvailable``; unbounded where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def return_freed_memory() -> bool:
    """Ask glibc's allocator to serve every allocation of 4 MiB or more with its own mapping, returned to the
    system when freed (``mallopt(M_MMAP_THRESHOLD, 4 MiB)``, which also fixes ``M_TRIM_THRESHOLD`` at glibc's
    default 128 KiB). Without it, glibc's dynamic threshold rises to 32 MiB once such a block is freed, and a
    solve's freed float64 matrices and a block's activations stay in the process as fragmented heap that later
    allocations of other sizes cannot reuse: the quantize phase's peak then grows with depth under disk offload
    and carries several hundred MiB of freed memory in memory (``benchmarks/memory.py``). Smaller allocations
    (a GPTQ column's update) keep the heap, so allocation stays fast. Process-wide, for the rest of the process
    (quantize runs and disk offload call it); False where the C library is not glibc."""
    mallopt = glibc("mallopt")
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 4 << 20)) and bool(mallopt(m_trim_threshold, 128 << 10))


def trim_heap() -> bool:
    """Give the memory freed so far back to the system (glibc ``malloc_trim(0)``: the heap's free top and its free
    pages inside, without changing how later allocations are served). The runner calls it before each layer's
    solve and after each block: freed statistics temporaries, float weights and activations would otherwise stay
    in the process as fragmented heap, and the peak would grow with depth (``benchmarks/memory.py
    --allocators``). False where the C library is not glibc."""
    malloc_trim = glibc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name → safetensors file of a Hugging Face checkpoint folder (``model.safetensors`` or a sharded
    ``model.safetensors.index.json``); ``FileNotFoundError`` naming the folder otherwise."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: disk offload reads safetensors checkpoints (model.safetensors or an "
                                "index); this folder has none")  # fmt: skip
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


class DiskOffload:
    """Where each offloaded tensor lives, and the hooks that load it (module docstring).

    ``files``: checkpoint tensor name → safetensors file; ``dtype``: the dtype tensors are loaded in;
    ``spill``: the folder quantized layers are spilled to (default: a temporary folder numcast creates and removes
    when this object goes)."""

    def __init__(self, files: dict[str, Path], dtype: torch.dtype, spill: Path | None = None) -> None:
        return_freed_memory()
        self._tmp = None if spill is not None else tempfile.TemporaryDirectory(prefix="numcast-spill-")
        self.files, self.dtype = files, dtype
        self.spill = Path(spill) if spill is not None else Path(self._tmp.name)
        self._names: dict[int, str] = {}  # id(block) -> its name in the model
        self._blocks: dict[int, nn.Module] = {}  # id(block) -> block
        self._pinned: set[int] = set()
        self._spilled: dict[int, Path] = {}  # id(quantized module) -> its QTensor file

    # ---- attaching ---------------------------------------------------------------------------
    def attach(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        """Release every block's tensors (to meta) and hook the blocks so that a forward loads them."""
        names = {id(m): n for n, m in model.named_modules()}
        for block in blocks:
            self._names[id(block)], self._blocks[id(block)] = names[id(block)], block
            self._release(block)
            self._hook(block)

    def _hook(self, module: nn.Module) -> None:
        def pre(mod, args, kwargs):  # a deep copy (the runner's float twin) carries the hook but is not ours
            if id(mod) in self._names and id(mod) not in self._pinned:
                self._load(mod)

        def post(mod, args, kwargs, out):
            if id(mod) in self._names and id(mod) not in self._pinned:
                self._release(mod)

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)

    # ---- the runner's calls ------------------------------------------------------------------
    def enter(self, block: nn.Module) -> None:
        """Load ``block`` and keep it loaded (its hooks idle) until :meth:`leave`."""
        if id(block) in self._names and id(block) not in self._pinned:
            self._load(block)
            self._pinned.add(id(block))

    def leave(self, block: nn.Module) -> None:
        """The block is done: spill its quantized layers, release everything else it holds."""
        if id(block) not in self._names:
            return
        self._pinned.discard(id(block))
        prefix = self._names[id(block)]
        for name, m in block.named_modules():
            if isinstance(m, QuantWeightModule) and id(m) not in self._spilled and m.qweight is not None:
                path = self.spill / f"{prefix}.{name}.qtensor" if name else self.spill / f"{prefix}.qtensor"
                self.spill.mkdir(parents=True, exist_ok=True)
                m.qweight.save(path, overwrite=True)
                self._spilled[id(m)] = path
        self._release(block)

    @contextmanager
    def materialize(self, block: nn.Module):
        """An offloaded ``block`` loaded for the duration, released afterwards (a pinned block stays as it is)."""
        if id(block) not in self._names or id(block) in self._pinned:
            yield block
            return
        self._load(block)
        try:
            yield block
        finally:
            self._release(block)

    def respill(self, module: QuantWeightModule, qweight: QTensor) -> None:
        """Replace a spilled layer's QTensor (its file rewritten, atomically); a loaded layer takes it now too."""
        qweight.save(self._spilled[id(module)], overwrite=True)
        if module.qweight is not None:
            module.set_qweight(qweight)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """(name, block) of every offloaded block, in model order."""
        return [(self._names[i], b) for i, b in self._blocks.items()]

    # ---- loading and releasing ---------------------------------------------------------------
    def _load(self, block: nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        prefix = self._names[id(block)]
        with ExitStack() as files:  # opened for this load only: a mapping kept open would hold its pages resident
            readers: dict[Path, object] = {}
            for name, m in block.named_modules():
                if isinstance(m, QuantWeightModule) and id(m) in self._spilled:
                    qt = QTensor.load(self._spilled[id(m)])
                    m.qweight = qt
                    m.weight = qt.dequantize().reshape(m.weight_shape).to(self.dtype)
                for pname, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                    if t.device.type != "meta":
                        continue
                    key = _key(prefix, name, pname)
                    if key not in self.files:
                        raise KeyError(f"{key}: not in the checkpoint; disk offload needs every block tensor there")
                    file = self.files[key]
                    if file not in readers:
                        readers[file] = files.enter_context(safe_open(str(file), framework="pt"))
                    value = readers[file].get_tensor(key)
                    value = value.to(self.dtype) if value.is_floating_point() else value
                    set_module_tensor_to_device(m, pname, "cpu", value=value)

    def _release(self, block: nn.Module) -> None:
        """Every tensor of the block the checkpoint holds goes back to meta, spilled QTensors too; what only
        lives in memory (activation ranges, RoPE's inv_freq, not-yet-spilled quantized weights) stays."""
        prefix = self._names[id(block)]
        for name, m in block.named_modules():
            if isinstance(m, QuantWeightModule) and id(m) in self._spilled:
                m.qweight = None
                m.weight = torch.empty(m.weight_shape, dtype=self.dtype, device="meta")
            for pname, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                if t.device.type == "meta" or _key(prefix, name, pname) not in self.files:
                    continue
                if isinstance(m, QuantWeightModule) and pname == "weight":
                    continue
                new = torch.empty_like(t, device="meta")
                if pname in m._parameters:
                    m._parameters[pname] = nn.Parameter(new, requires_grad=t.requires_grad)
                else:
                    m._buffers[pname] = new


def _key(prefix: str, module: str, tensor: str) -> str:
    return ".".join(p for p in (prefix, module, tensor) if p)
