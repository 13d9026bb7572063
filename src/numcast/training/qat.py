"""Accumulator-aware quantization-aware training (A2Q / A2Q+, papers.md §3): float checkpoint → A2Q layers with
EP-init → activation calibration → QAT with the norm regulariser. A plain PyTorch loop with a progress bar.

- :func:`prepare_a2q`: a copy of a float model whose ``nn.Conv2d`` / ``nn.Linear`` layers become
  :class:`~numcast.nn.a2q.A2QConv2d` / :class:`~numcast.nn.a2q.A2QLinear`: M-bit weights under the budget of a
  P-bit accumulator, inputs quantized to N-bit integers with one static scale per tensor (the first layer's
  input — the image — with ``first_input_bits``), unsigned where the calibration inputs are never negative.
  EP-init (A2Q+ §3.3) sets each layer's direction and norm, then the input scales are calibrated (``observer``).
- :func:`train_qat`: Adam (the Brevitas A2Q example's optimizer; no weight decay on the norms and scales),
  cosine learning rate over the run, cross-entropy + ``reg_weight``·Σ ReLU(g − s·T), batches drawn with a
  local generator (the global RNG is never touched). Batch-norm layers stay in float and keep training.
- :func:`export_a2q`: the trained model with inference modules (``int{M}_channel`` QTensors, exact codes).

Deterministic on the CPU for a given thread count: same inputs and seed → bit-identical weights.

Under torch.distributed (``torchrun``), :func:`train_qat` is data-parallel with DDP's semantics: every rank
draws the same global batch, computes its contiguous part, batch-norm statistics are those of the whole global
batch (summed over the ranks; torch's SyncBatchNorm runs on GPUs only), and the gradients are summed over the
ranks every step, so the result matches one process with the same ``batch_size`` within float tolerance
(:mod:`numcast.pipeline.distributed`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from numcast.algorithms.ep_init import A2QRule
from numcast.nn.a2q import REGULARIZER_WEIGHT, A2QConv2d, A2QLinear, a2q_penalty
from numcast.nn.act_quant import ActQuantizer, calibrate
from numcast.nn.observe import observe_inputs
from numcast.nn.surgery import set_module
from numcast.pipeline import distributed


@dataclass
class QATConfig:
    """QAT settings. ``epochs`` × ``steps_per_epoch`` steps (``steps_per_epoch=None``: one pass over the data)."""

    epochs: int = 1
    steps_per_epoch: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    reg_weight: float = REGULARIZER_WEIGHT
    seed: int = 0
    threads: int | None = None
    progress: bool = True


@dataclass
class QATResult:
    model: nn.Module
    losses: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def prepare_a2q(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    weight_bits: int = 4,
    input_bits: int = 4,
    accumulator_bits: int = 14,
    rule: A2QRule = "a2q+",
    first_input_bits: int = 8,
    observer: str = "mse",
    ep_init: bool = True,
    batch_size: int = 256,
) -> nn.Module:
    """The A2Q/A2Q+ model (see module docstring); ``model`` is not modified. ``calibration``: model inputs."""
    model = copy.deepcopy(model).eval()
    layers = _layers(model)
    if not layers:
        raise ValueError("the model has no nn.Conv2d / nn.Linear layer to constrain")

    def run() -> None:  # the calibration images, in batches
        for i in range(0, calibration.shape[0], batch_size):
            model(calibration[i : i + batch_size])

    stats = observe_inputs(dict(layers), run)
    for i, (name, m) in enumerate(layers):
        bits = first_input_bits if i == 0 else input_bits
        fmt = f"{'u' if stats[name].nonnegative else ''}int{bits}_tensor"
        axis = 1 if isinstance(m, nn.Conv2d) else -1
        act = ActQuantizer(fmt, mode="static", observer=observer, axis=axis)
        cls = A2QConv2d if isinstance(m, nn.Conv2d) else A2QLinear
        new = cls(m, weight_bits, act, accumulator_bits, rule)
        if ep_init:
            new.weight_quant.ep_init_()
        set_module(model, name, new)
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    calibrate(quants, run)
    return model


def train_qat(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: QATConfig,
              penalty: Callable[[nn.Module], torch.Tensor] = a2q_penalty) -> QATResult:  # fmt: skip
    """Train ``model`` (in place) on ``images`` ``[N, ...]`` / ``labels`` ``[N]``; returns it in eval mode.
    ``penalty(model)``: the regulariser, evaluated after each forward (default: numcast's A2Q layers').
    Under torch.distributed every rank passes the same data and trains its part of each batch (module
    docstring); ``losses`` are the global batch's."""
    n = images.shape[0]
    if n == 0 or labels.shape[0] != n:
        raise ValueError(f"need as many (>0) images as labels, got {n} and {labels.shape[0]}")
    ranks = distributed.rank_info().world_size
    if min(cfg.batch_size, n) < ranks:
        raise ValueError(f"a batch of {min(cfg.batch_size, n)} samples cannot be split over {ranks} ranks")
    distributed.broadcast_module(model)  # DDP: the same start on every rank
    steps = cfg.steps_per_epoch or math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps
    scales = [p for name, p in model.named_parameters() if name.endswith(("log2_g", "log2_s")) or "bias" in name]
    ids = {id(p) for p in scales}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [{"params": rest, "weight_decay": cfg.weight_decay}, {"params": scales, "weight_decay": 0.0}]
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    gen = torch.Generator().manual_seed(cfg.seed)
    prev = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    res = QATResult(model)
    try:
        model.train()
        with _batch_norm_over_ranks(model):
            for epoch in range(cfg.epochs):
                perm = torch.randperm(n, generator=gen)
                t0 = time.perf_counter()
                bar = tqdm(range(steps), desc=f"QAT epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress)
                for i in bar:
                    idx = perm[(i * cfg.batch_size) % n :][: cfg.batch_size]
                    res.losses.append(_step(model, images, labels, idx, opt, cfg.reg_weight, penalty))
                    sched.step()
                    if i % 20 == 0:
                        bar.set_postfix(loss=f"{res.losses[-1]:.3f}")
                bar.close()
                res.epoch_seconds.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    model.eval()
    return res


def _step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, opt, reg_weight: float,
          penalty: Callable[[nn.Module], torch.Tensor]) -> float:  # fmt: skip
    """One optimizer step on the batch ``idx``; returns its cross-entropy. Under torch.distributed this rank
    takes its contiguous part of ``idx``, weighs its mean loss by its share and the regulariser by 1/N, and the
    gradients are summed over the ranks: the gradient of the whole batch's loss, as in one process."""
    ranks = distributed.rank_info().world_size
    if ranks == 1:
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        total_loss = loss + reg_weight * penalty(model)
    else:
        if idx.numel() < ranks:
            raise ValueError(f"a batch of {idx.numel()} samples cannot be split over {ranks} ranks")
        mine = idx[distributed.my_slice(idx.numel())]
        loss = F.cross_entropy(model(images[mine]), labels[mine]) * (mine.numel() / idx.numel())
        total_loss = loss + reg_weight * penalty(model) / ranks
    opt.zero_grad(set_to_none=True)
    total_loss.backward()
    value = loss.detach().reshape(1).clone()
    grads = [p.grad for group in opt.param_groups for p in group["params"]]
    distributed.all_reduce_([*grads, value])  # one process: nothing to do
    opt.step()
    return float(value)


class _BatchNormOverRanks(nn.Module):
    """A batch-norm layer whose training-mode statistics are those of the global batch, summed over the ranks
    (two differentiable all-reduces: the mean, then the biased variance; running statistics updated as torch's
    batch norm does, with the unbiased variance); the wrapped layer itself in eval mode."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not bn.training:
            return bn(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        sums = distributed.sum_with_grad(torch.cat([x.sum(dims), count]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        xc = x - mean.reshape(shape)
        var = distributed.sum_with_grad(xc.square().sum(dims)) / n
        if bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                bn.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        y = xc * torch.rsqrt(var + bn.eps).reshape(shape)
        return y * bn.weight.reshape(shape) + bn.bias.reshape(shape) if bn.affine else y


@contextmanager
def _batch_norm_over_ranks(model: nn.Module):
    """Under torch.distributed, every batch-norm layer of ``model`` takes the global batch's statistics for a
    while (:class:`_BatchNormOverRanks`, the same parameters and buffers); nothing changes in one process."""
    swaps = []
    if distributed.active():
        swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name, m in swaps:
        set_module(model, name, _BatchNormOverRanks(m))
    try:
        yield
    finally:
        for name, m in swaps:
            set_module(model, name, m)


def export_a2q(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every A2Q layer replaced by its inference module (exact integer codes)."""
    model = copy.deepcopy(model).eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, (A2QConv2d, A2QLinear)):
            set_module(model, name, m.to_quant())
    return model
