"""Workloads by short name: the model, its blocks, its calibration data and its evaluation protocol.

- ``minilm-l6``: all-MiniLM-L6-v2 encoder; calibration sample = a 48-word chunk of a calibration article;
  metrics: mean cosine to the float embeddings (primary: the fidelity of the quantized encoder, over the
  WordSim words and the Lee documents), WordSim-353 Spearman, Lee-50 Pearson (task scores: with 353 pairs and
  50 documents they move by ±0.01 under mere rounding noise, RTN at 8 bits even "beats" float).
- ``smollm2-135m``: SmolLM2-135M decoder; sample = a 512-token window (BOS first) of calibration articles;
  metrics: perplexity on 8 × 512 evaluation tokens (primary), and against the float model's next-token
  distributions on them: KL divergence (a lower bound: its 64 most likely tokens apart, the rest merged) and top-1
  agreement (:func:`numcast.evaluate.text.lm_fidelity`). The float reference is the first model evaluated
  (``Workload.reference_from_first_evaluation``; a model with quantized layers first is refused).
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
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from numcast.models.user_data import UserData
from numcast.pipeline.offload import available_memory

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
    data: dict = field(default_factory=dict)  # the user's data used (report records), empty for the shipped
    tokenizer: object = None  # text models: the tokenizer (lm-eval needs it)
    source: Path | None = None  # the file or folder the model was loaded from (a .gguf, a HF folder), if any
    dtype: str = "float32"  # the dtype the model was loaded in
    offload: str = "none"  # "disk": the model's layers stay on disk until used (numcast.pipeline.offload)
    reference_from_first_evaluation: bool = False  # comparison metrics refer to the first model evaluated (the float
    # one, which numcast's runs measure first), not to a reference taken at load time


def _batches(items, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


Data = tuple[UserData | None, UserData | None] | None  # (calibration, evaluation) data of the user, or None


def _texts(data: UserData | None, model: str) -> list[str] | None:
    """The user's texts, or None without data; ``ValueError`` for images given to a text model."""
    if data is None or data.kind == "tensors":
        return None
    if data.kind != "text":
        raise ValueError(f"{data.path}: {data.kind} data for {model}, which takes text (.txt, a folder of .txt, "
                         ".jsonl) or tensors")  # fmt: skip
    return data.texts


def _encoder(name: str, model: nn.Module, tok, blocks, description: str, data: Data = None) -> Workload:
    """Sentence-embedding protocol: mean-pooled, L2-normalised last hidden states
    (:func:`numcast.models.minilm.embed`). User text: calibration chunks of its words; evaluation: the mean
    cosine of each text's embedding to the float one."""
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

    cal, ev = data or (None, None)
    cal_texts = _texts(cal, name) or wiki_split()[0]
    eval_texts = _texts(ev, name)

    def calibration(n: int) -> list:
        words = " ".join(cal_texts).split()
        chunks = [" ".join(words[i : i + 48]) for i in range(0, 48 * n, 48)][:n]
        if len(chunks) < n:
            src = cal.path if cal is not None else "the calibration articles"
            raise ValueError(f"{src} holds {len(chunks)} chunks of 48 words, {n} were asked for")
        return [tokenize(tok, b) for b in _batches(chunks, CALIB_BATCH["minilm-l6"])]

    def evaluate(m) -> dict[str, float]:
        if eval_texts:
            got = embed(m, tok, eval_texts)
            return {"embedding_cosine": float((got * ref_embed(eval_texts)).sum(1).mean())}
        return encoder_metrics(lambda t: embed(m, tok, t), ref_embed)

    return Workload(name, model, blocks, calibration, evaluate, "embedding_cosine", True, description)


def _causal_lm(name: str, model: nn.Module, tok, blocks, description: str, notes=lambda fmt: None,
               data: Data = None, source: Path | None = None) -> Workload:  # fmt: skip
    """Perplexity protocol: 512-token windows of the calibration articles; 8 × 512 evaluation tokens. User text:
    the same windows of it (evaluation: up to 8 windows, as many as it holds)."""
    from numcast.evaluate.text import lm_fidelity, token_windows, wiki_split

    user_cal, user_ev = data or (None, None)
    cal, ev = wiki_split()
    cal = _texts(user_cal, name) or cal
    if user_ev is not None and user_ev.kind == "text":
        try:
            eval_windows = token_windows(tok, user_ev.texts, 8, 512, at_most=True)
        except ValueError as exc:
            raise ValueError(f"{user_ev.path}: too short for one evaluation window of 512 tokens ({exc})") from exc
    else:
        eval_windows = token_windows(tok, ev, 8, 512)

    def calibration(n: int) -> list:
        win = token_windows(tok, cal, n, 512)
        return [{"input_ids": b, "use_cache": False} for b in _batches(win, CALIB_BATCH["smollm2-135m"])]

    reference: list = []  # the float model's next-token distributions, taken at its (the first) evaluation

    def evaluate(m: nn.Module) -> dict[str, float]:
        if reference:
            return lm_fidelity(m, eval_windows, reference[0])[0]
        if has_quantized_layers(m):
            raise ValueError(f"{name}: evaluate the float model first; its next-token distributions are the reference "
                             "of kl_divergence and top1_agreement")  # fmt: skip
        metrics, ref = lm_fidelity(m, eval_windows)
        reference.append(ref)
        return metrics

    return Workload(name, model, blocks, calibration, evaluate, "perplexity", False, description, notes, tokenizer=tok,
                    source=source, reference_from_first_evaluation=True)  # fmt: skip


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds any of numcast's quantized layers (weights or activation quantizers)."""
    from numcast.nn.act_quant import ActQuantizer
    from numcast.nn.modules import QuantWeightModule

    return any(isinstance(m, (QuantWeightModule, ActQuantizer)) for m in model.modules())


def _minilm(data: Data = None, dtype: str = "auto", offload: str = "none") -> Workload:
    from numcast.models.minilm import load_minilm, minilm_blocks

    model, tok = load_minilm(dtype)
    return _encoder("minilm-l6", model, tok, minilm_blocks,
                    "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M params, fp32)", data)  # fmt: skip


def _smollm2(data: Data = None, dtype: str = "auto", offload: str = "none") -> Workload:
    from numcast.models.smollm2 import GGUF_GRID_NOTE, gguf_path, load_smollm2, smollm2_blocks

    model, tok = load_smollm2(dtype=dtype, offload=offload)

    def notes(fmt: str) -> str | None:
        from numcast.formats.registry import get_format

        f = get_format(fmt)
        grid = f.element.kind == "int" and f.element.bits == 4 and f.block_size and 32 % f.block_size == 0
        return GGUF_GRID_NOTE if grid else None

    return _causal_lm("smollm2-135m", model, tok, smollm2_blocks,
                      "SmolLM2-135M (Llama, 30 layers, 134.5 M params; GGUF Q4_1 -> fp32)", notes, data,
                      gguf_path())  # fmt: skip


def _local(path: str, data: Data = None, dtype: str = "auto", offload: str = "none") -> Workload:
    """A local HF folder or .gguf file: the causal-LM or the encoder protocol by the model's kind."""
    from numcast.models.hf_local import load_local_model, transformer_blocks

    model, tok, kind, folder = load_local_model(path, dtype, offload)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    desc = f"{type(model).__name__} from {path} ({n:.1f} M params, {str(model.dtype).removeprefix('torch.')})"
    name = str(Path(path).expanduser().resolve())
    if kind == "causal-lm":
        return _causal_lm(name, model, tok, transformer_blocks, desc, data=data, source=Path(name))
    w = _encoder(name, model, tok, transformer_blocks, desc, data)
    w.source = Path(name)
    return w


def _images(data: UserData | None, model: str) -> UserData | None:
    """The user's images, or None without them; ``ValueError`` for text given to an image model."""
    if data is None or data.kind == "tensors":
        return None
    if data.kind != "images":
        raise ValueError(f"{data.path}: {data.kind} data for {model}, which takes images (a folder, with class "
                         "subfolders for labels) or tensors")  # fmt: skip
    return data


def _classifier_eval(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 64):
    """(evaluate, primary): top-1 accuracy where labels exist (plus agreement/KL to float), else agreement/KL."""
    from numcast.evaluate.vision import agreement_and_kl, logits_of, top1_accuracy

    ref = logits_of(model, images, batch_size=batch_size)

    def evaluate(m) -> dict[str, float]:
        lg = logits_of(m, images, batch_size=batch_size)
        out = agreement_and_kl(ref, lg)
        return {"top1_accuracy": top1_accuracy(lg, labels), **out} if labels is not None else out

    return evaluate, ("top1_accuracy" if labels is not None else "top1_agreement")


def _imagenet(name: str, data: Data = None) -> Workload:
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
    cal, ev = data or (None, None)
    cal, ev = _images(cal, name), _images(ev, name)
    photos = natural_photos()
    if ev is not None:  # the user's photos: the standard centre crop of each
        crops = image_crops(ev.images, len(ev.images), mean=mean, std=std)
        evaluate, primary = _classifier_eval(model, crops, ev.labels)
    else:
        eval_images = image_crops(photos, 256, mean=mean, std=std, seed=0)
        ref = logits_of(model, eval_images)
        evaluate, primary = (lambda m: agreement_and_kl(ref, logits_of(m, eval_images))), "top1_agreement"

    def calibration(n: int) -> list:
        if cal is not None:
            if n > len(cal.images):
                raise ValueError(f"{cal.path} holds {len(cal.images)} images; {n} were asked for")
            return _batches(image_crops(cal.images, n, mean=mean, std=std), CALIB_BATCH[name])
        return _batches(image_crops(photos, n, mean=mean, std=std, seed=1), CALIB_BATCH[name])

    return Workload(name, model, blocks, calibration, evaluate, primary, True, desc, first_block_input="model")


def _fmnist(data: Data = None) -> Workload:
    from numcast.models.fashion_mnist import grayscale_28, load_fashion_mnist
    from numcast.models.fmnist_cnn import fmnist_blocks, load_fmnist_cnn

    model = load_fmnist_cnn()
    cal, ev = data or (None, None)
    cal, ev = _images(cal, "fmnist-cnn"), _images(ev, "fmnist-cnn")
    if ev is not None:
        x_test, y_test = grayscale_28(ev.images), ev.labels
    else:
        x_test, y_test = load_fashion_mnist("test")
    evaluate, primary = _classifier_eval(model, x_test, y_test, batch_size=1000)

    def calibration(n: int) -> list:
        x = grayscale_28(cal.images) if cal is not None else load_fashion_mnist("train")[0]
        if n > x.shape[0]:
            src = cal.path if cal is not None else f"fmnist-cnn calibrates on the {x.shape[0]} training images;"
            raise ValueError(f"{src} {n} were asked for" if cal is None else f"{src} holds {x.shape[0]} images; "
                             f"{n} were asked for")  # fmt: skip
        return _batches(x[:n], CALIB_BATCH["fmnist-cnn"])

    return Workload("fmnist-cnn", model, fmnist_blocks, calibration, evaluate, primary, True,
                    "numcast's Fashion-MNIST ResNet-style CNN (trained deterministically, shipped)")  # fmt: skip


def _with_tensors(w: Workload, cal: UserData | None, ev: UserData | None) -> Workload:
    """Tensor data (model inputs, samples along dim 0) for any workload: calibration batches of it; evaluation:
    the cosine of the model's output (first output tensor: logits, hidden states) to the float one."""
    from numcast.evaluate.vision import output_cosine

    if cal is not None and cal.kind == "tensors":
        size = CALIB_BATCH.get(w.name, 8)
        w.calibration = lambda n: cal.batches(n, size)
    if ev is not None and ev.kind == "tensors":
        inputs = ev.batches(ev.count, CALIB_BATCH.get(w.name, 8))
        evaluate = output_cosine(w.model, inputs)
        w.evaluate, w.primary, w.higher_is_better = evaluate, "output_cosine", True
    return w


def _choose_offload(offload: str, key: str, name: str) -> str:
    """``offload`` as asked, or for ``auto``: ``disk`` for a causal LM whose checkpoint, three times over (the
    model, its float twin of a block, activations and statistics are smaller, but the quantized model's cached
    float weights are not), exceeds the memory available now (``MemAvailable``), else ``none``."""
    if offload not in ("none", "disk", "auto"):
        raise ValueError(f"unknown offload {offload!r}; one of none, disk, auto")
    if offload != "auto":
        return offload
    from numcast.models.hf_local import is_model_path

    if key in OFFLOAD_WORKLOADS:
        from numcast.models.smollm2 import float_folder

        folder = float_folder()
    elif key not in LOADERS and is_model_path(name) and Path(name).is_dir():
        folder = Path(name)
    else:
        return "none"
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return "disk" if 3 * size > available_memory() else "none"


LOADERS: dict[str, Callable[..., Workload]] = {
    "minilm-l6": _minilm,
    "smollm2-135m": _smollm2,
    "mobilenet-v2": lambda data=None: _imagenet("mobilenet-v2", data),
    "efficientnet-lite0": lambda data=None: _imagenet("efficientnet-lite0", data),
    "fmnist-cnn": _fmnist,
}


DTYPE_WORKLOADS = ("minilm-l6", "smollm2-135m")  # Hugging Face models: any dtype; the others ship float32 only
OFFLOAD_WORKLOADS = ("smollm2-135m",)  # causal LMs: their layers can stay on disk


def _load(key: str, data: Data, dtype: str = "auto", offload: str = "none") -> Workload:
    """A registered workload; one whose loader takes no data argument accepts only tensor data (applied by
    :func:`_with_tensors`)."""
    loader = LOADERS[key]
    if offload != "none" and key not in OFFLOAD_WORKLOADS:
        raise ValueError(f"--offload {offload} keeps a causal LM's layers on disk; {key} is not one (it fits in "
                         "memory: use --offload none)")  # fmt: skip
    if key in DTYPE_WORKLOADS:
        return loader(data, dtype, offload)
    if dtype not in ("auto", "float32"):
        raise ValueError(f"{key} ships float32 weights and is evaluated in float32; --dtype {dtype} is for Hugging "
                         f"Face models ({', '.join(DTYPE_WORKLOADS)}, local folders)")  # fmt: skip
    if data and inspect.signature(loader).parameters:
        return loader(data)
    for d in data or ():
        if d is not None and d.kind != "tensors":
            raise ValueError(f"{d.path}: the {key} workload takes only tensor data (.pt / .safetensors)")
    return loader()


def load_workload(name: str, calibration_data: str | Path | UserData | None = None,
                  eval_data: str | Path | UserData | None = None, dtype: str = "auto",
                  offload: str = "none") -> Workload:  # fmt: skip
    """The workload for a short model name, or for a path to a local Hugging Face model folder or ``.gguf``
    file (``KeyError``-free: unknown names raise ``ValueError`` listing the known ones; a missing model package
    raises ``MissingAssetError`` with its install command). ``calibration_data`` / ``eval_data``: the user's
    data (a path, :mod:`numcast.models.user_data`) instead of the shipped protocol's; ``Workload.data`` records
    what was used. ``dtype``: ``auto`` (the dtype the checkpoint stores), ``float32``, ``bfloat16`` or ``float16``
    (:func:`numcast.models.hf_local.resolve_dtype`; Hugging Face models only). ``offload``: ``none``, ``disk``
    (a causal LM's layers stay on disk until used: :mod:`numcast.pipeline.offload`) or ``auto`` (``disk`` when
    three times the checkpoint would not fit in the memory available now). The caller's global RNG state is
    left unchanged."""
    from numcast.models.hf_local import is_model_path
    from numcast.models.user_data import load_user_data

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cal = load_user_data(calibration_data) if isinstance(calibration_data, (str, Path)) else calibration_data
    ev = load_user_data(eval_data) if isinstance(eval_data, (str, Path)) else eval_data
    data = (cal, ev) if (cal or ev) else None
    key = name.strip().lower()
    if key not in LOADERS and not is_model_path(name):
        close = difflib.get_close_matches(key, list(LOADERS), n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; known models: {', '.join(LOADERS)}, or a path to a "
                         "local Hugging Face model folder (with config.json) or a .gguf file")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
        offload = _choose_offload(offload, key, name)
        w = _load(key, data, dtype, offload) if key in LOADERS else _local(name, data, dtype, offload)
        w = _with_tensors(w, cal, ev)
    w.dtype = str(next(w.model.parameters()).dtype).removeprefix("torch.")
    w.offload = offload
    w.data = {"calibration": cal.record() if cal else None, "evaluation": ev.record() if ev else None}
    return w
