"""Workloads by short name: the model, its blocks, its calibration data and its evaluation protocol.

- ``minilm-l6``: all-MiniLM-L6-v2 encoder; calibration sample = a 48-word chunk of a calibration article;
  metrics: mean cosine to the float embeddings (primary: the fidelity of the quantized encoder, over the
  WordSim words and the Lee documents), WordSim-353 Spearman, Lee-50 Pearson (task scores: with 353 pairs and
  50 documents they move by ±0.01 under mere rounding noise, RTN at 8 bits even "beats" float).
- ``smollm2-135m``: SmolLM2-135M decoder; sample = a 512-token window (BOS first) of calibration articles;
  metric: perplexity on 8 × 512 evaluation tokens.
- ``mobilenet-v2`` / ``efficientnet-lite0``: ImageNet CNNs; sample = a random crop of a shipped photo (seed 1);
  metrics: top-1 agreement (primary) and KL divergence against float on 256 crops (seed 0).
- ``fmnist-cnn``: numcast's Fashion-MNIST CNN; sample = a training image (file order); metrics: test top-1
  accuracy (primary), agreement and KL against float.

- a path to a local Hugging Face folder or ``.gguf`` file (:mod:`numcast.models.hf_local`): a causal LM
  takes the ``smollm2-135m`` protocol, an encoder the ``minilm-l6`` one (mean-pooled embeddings); blocks are
  the model's repeated layers.

Evaluation data never overlaps calibration data (disjoint articles; different crop seeds; train vs test).
The float reference of every metric is measured on the float model before quantization and cached.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

CALIB_BATCH = {"minilm-l6": 16, "smollm2-135m": 2, "mobilenet-v2": 32, "efficientnet-lite0": 32, "fmnist-cnn": 128}


@dataclass
class Workload:
    """A loaded model with its protocol. ``evaluate(model)`` returns the metrics of ``model`` (the float model's
    references for comparison metrics are taken at load time)."""

    name: str
    model: nn.Module
    blocks: Callable[[nn.Module], list[nn.Module]]
    calibration: Callable[[int], list]
    evaluate: Callable[[nn.Module], dict[str, float]]
    primary: str
    higher_is_better: bool
    description: str
    notes: Callable[[str], str | None] = field(default=lambda fmt: None)
    first_block_input: str = "capture"  # "model": the calibration tensors feed the first block directly


def _batches(items, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _encoder(name: str, model: nn.Module, tok, blocks, description: str) -> Workload:
    """Sentence-embedding protocol: mean-pooled, L2-normalised last hidden states
    (:func:`numcast.models.minilm.embed`)."""
    import copy

    from numcast.evaluate.text import encoder_metrics, wiki_split
    from numcast.models.minilm import embed, tokenize

    ref = copy.deepcopy(model)
    cache: dict = {}

    def ref_embed(texts):
        key = tuple(texts)
        if key not in cache:
            cache[key] = embed(ref, tok, texts)
        return cache[key]

    def calibration(n: int) -> list:
        words = " ".join(wiki_split()[0]).split()
        chunks = [" ".join(words[i : i + 48]) for i in range(0, 48 * n, 48)][:n]
        if len(chunks) < n:
            raise ValueError(f"the calibration articles hold {len(chunks)} chunks, {n} were asked for")
        return [tokenize(tok, b) for b in _batches(chunks, CALIB_BATCH["minilm-l6"])]

    def evaluate(m) -> dict[str, float]:
        return encoder_metrics(lambda t: embed(m, tok, t), ref_embed)

    return Workload(name, model, blocks, calibration, evaluate, "embedding_cosine", True, description)


def _causal_lm(name: str, model: nn.Module, tok, blocks, description: str, notes=lambda fmt: None) -> Workload:
    """Perplexity protocol: 512-token windows of the calibration articles; 8 × 512 evaluation tokens."""
    from numcast.evaluate.text import perplexity, token_windows, wiki_split

    cal, ev = wiki_split()
    eval_windows = token_windows(tok, ev, 8, 512)

    def calibration(n: int) -> list:
        win = token_windows(tok, cal, n, 512)
        return [{"input_ids": b, "use_cache": False} for b in _batches(win, CALIB_BATCH["smollm2-135m"])]

    return Workload(name, model, blocks, calibration, lambda m: {"perplexity": perplexity(m, eval_windows)},
                    "perplexity", False, description, notes)  # fmt: skip


def _minilm() -> Workload:
    from numcast.models.minilm import load_minilm, minilm_blocks

    model, tok = load_minilm()
    return _encoder("minilm-l6", model, tok, minilm_blocks,
                    "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M params, fp32)")  # fmt: skip


def _smollm2() -> Workload:
    from numcast.models.smollm2 import GGUF_GRID_NOTE, load_smollm2, smollm2_blocks

    model, tok = load_smollm2()

    def notes(fmt: str) -> str | None:
        from numcast.formats.registry import get_format

        f = get_format(fmt)
        grid = f.element.kind == "int" and f.element.bits == 4 and f.block_size and 32 % f.block_size == 0
        return GGUF_GRID_NOTE if grid else None

    return _causal_lm("smollm2-135m", model, tok, smollm2_blocks,
                      "SmolLM2-135M (Llama, 30 layers, 134.5 M params; GGUF Q4_1 -> fp32)", notes)  # fmt: skip


def _local(path: str) -> Workload:
    """A local HF folder or .gguf file: the causal-LM or the encoder protocol by the model's kind."""
    from numcast.models.hf_local import load_local_model, transformer_blocks

    model, tok, kind, folder = load_local_model(path)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    desc = f"{type(model).__name__} from {path} ({n:.1f} M params, fp32)"
    name = str(Path(path).expanduser().resolve())
    make = _causal_lm if kind == "causal-lm" else _encoder
    return make(name, model, tok, transformer_blocks, desc)


def _imagenet(name: str) -> Workload:
    from numcast.evaluate.vision import agreement_and_kl, logits_of
    from numcast.models.data import image_crops, natural_photos

    if name == "mobilenet-v2":
        from numcast.models.mobilenet_v2 import IMAGENET_MEAN as mean
        from numcast.models.mobilenet_v2 import IMAGENET_STD as std
        from numcast.models.mobilenet_v2 import load_mobilenet_v2 as load
        from numcast.models.mobilenet_v2 import mobilenet_v2_blocks as blocks

        desc = "MobileNetV2 (ImageNet, torchvision weights, 3.5 M params, fp32)"
    else:
        from numcast.models.efficientnet_lite0 import MEAN as mean
        from numcast.models.efficientnet_lite0 import STD as std
        from numcast.models.efficientnet_lite0 import efficientnet_blocks as blocks
        from numcast.models.efficientnet_lite0 import load_efficientnet_lite0 as load

        desc = "EfficientNet-Lite0 (ImageNet, 4.65 M params, fp32)"
    model = load()
    photos = natural_photos()
    eval_images = image_crops(photos, 256, mean=mean, std=std, seed=0)
    ref = logits_of(model, eval_images)

    def calibration(n: int) -> list:
        return _batches(image_crops(photos, n, mean=mean, std=std, seed=1), CALIB_BATCH[name])

    return Workload(name, model, blocks, calibration, lambda m: agreement_and_kl(ref, logits_of(m, eval_images)),
                    "top1_agreement", True, desc, first_block_input="model")  # fmt: skip


def _fmnist() -> Workload:
    from numcast.evaluate.vision import agreement_and_kl, logits_of, top1_accuracy
    from numcast.models.fashion_mnist import load_fashion_mnist
    from numcast.models.fmnist_cnn import fmnist_blocks, load_fmnist_cnn

    model = load_fmnist_cnn()
    x_test, y_test = load_fashion_mnist("test")
    ref = logits_of(model, x_test, batch_size=1000)

    def calibration(n: int) -> list:
        x, _ = load_fashion_mnist("train")
        if n > x.shape[0]:
            raise ValueError(f"fmnist-cnn calibrates on the {x.shape[0]} training images; {n} were asked for")
        return _batches(x[:n], CALIB_BATCH["fmnist-cnn"])

    def evaluate(m) -> dict[str, float]:
        lg = logits_of(m, x_test, batch_size=1000)
        return {"top1_accuracy": top1_accuracy(lg, y_test), **agreement_and_kl(ref, lg)}

    return Workload("fmnist-cnn", model, fmnist_blocks, calibration, evaluate, "top1_accuracy", True,
                    "numcast's Fashion-MNIST ResNet-style CNN (trained deterministically, shipped)")  # fmt: skip


LOADERS: dict[str, Callable[[], Workload]] = {
    "minilm-l6": _minilm,
    "smollm2-135m": _smollm2,
    "mobilenet-v2": lambda: _imagenet("mobilenet-v2"),
    "efficientnet-lite0": lambda: _imagenet("efficientnet-lite0"),
    "fmnist-cnn": _fmnist,
}


def load_workload(name: str) -> Workload:
    """The workload for a short model name, or for a path to a local Hugging Face model folder or ``.gguf``
    file (``KeyError``-free: unknown names raise ``ValueError`` listing the known ones; a missing model package
    raises ``MissingAssetError`` with its install command). The caller's global RNG state is left unchanged."""
    from numcast.models.hf_local import is_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    key = name.strip().lower()
    if key not in LOADERS and is_model_path(name):
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
            return _local(name)
    if key not in LOADERS:
        close = difflib.get_close_matches(key, list(LOADERS), n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(LOADERS)}, or a path to a "
                         "local Hugging Face model folder (with config.json) or a .gguf file")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
        return LOADERS[key]()
