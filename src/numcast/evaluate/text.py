"""Language-model and text-encoder metrics on the Wikipedia excerpt and the human-rated similarity sets.

Split protocol (``wiki_split``): the excerpt's articles in file order; the first 80 % are the calibration
articles, the last 20 % the evaluation articles — disjoint by construction.

Perplexity protocol (``perplexity``): evaluation articles joined with blank lines, tokenized once; the
first ``windows`` non-overlapping windows of ``seq_len − 1`` tokens, each prefixed with BOS (when the
tokenizer has one), scored with teacher forcing; perplexity = exp(mean token NLL) over all predicted
tokens of all windows (8 × 512 by default).

Encoder protocol: WordSim-353 Spearman between cosine similarities of the single-word embeddings and the
human scores; Lee 50 documents Pearson between the 1225 upper-triangle cosines and the symmetrised
human ratings; fidelity = mean cosine between float and quantized embeddings of the same texts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from numcast.models.data import lee_corpus, upper_triangle_pairs, wikipedia_articles, wordsim353


def wiki_split(frac_calibration: float = 0.8) -> tuple[list[str], list[str]]:
    """(calibration articles, evaluation articles), disjoint (see module docstring)."""
    arts = wikipedia_articles()
    k = int(len(arts) * frac_calibration)
    return arts[:k], arts[k:]


def token_windows(tok, texts: list[str], n: int, seq_len: int, at_most: bool = False) -> torch.Tensor:
    """``n`` windows [n, seq_len] of consecutive tokens of ``texts`` (BOS first when the tokenizer has one).
    ``at_most``: as many as the text holds, up to ``n`` (at least one); else exactly ``n``."""
    bos = getattr(tok, "bos_token_id", None)
    body = seq_len - (1 if bos is not None else 0)
    ids = tok("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if at_most:
        n = min(n, ids.numel() // body)
    if n < 1 or ids.numel() < n * body:
        raise ValueError(f"the text has {ids.numel()} tokens, {max(n, 1)} window(s) of {body} need {max(n, 1) * body}")
    win = ids[: n * body].reshape(n, body)
    if bos is not None:
        win = torch.cat([torch.full((n, 1), bos, dtype=win.dtype), win], dim=1)
    return win


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1) -> float:
    """exp(mean next-token NLL) of a causal LM over ``windows`` [n, seq_len] (first token not predicted).
    One window at a time by default: a vocabulary of 49k makes one 512-token window's logits 100 MB."""
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size]
        nll += _nll(model(input_ids=x).logits.float(), x)
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def _nll(logits: torch.Tensor, x: torch.Tensor) -> float:
    """Σ next-token negative log-likelihood of windows ``x`` [b, T] under ``logits`` [b, T, V] (float32)."""
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))


REFERENCE_TOP_K = 64  # tokens of the reference distribution kept apart per position (the rest: one outcome)


@dataclass
class NextTokenReference:
    """A reference model's next-token distributions on evaluation windows [n, T], per predicted position: the log-
    probabilities of its ``k`` most likely tokens (``logp`` [n, T−1, k], float32) and their ids (``index``), the
    log of the probability left to every other token (``log_rest`` [n, T−1]) and its most likely token
    (``top1`` [n, T−1], ``argmax``)."""

    logp: torch.Tensor
    index: torch.Tensor
    log_rest: torch.Tensor
    top1: torch.Tensor

    def window(self, i: int) -> NextTokenReference:
        """Window i's part (a batch of one)."""
        return NextTokenReference(*(getattr(self, f.name)[i : i + 1] for f in fields(self)))

    @staticmethod
    def cat(parts: list[NextTokenReference]) -> NextTokenReference:
        """Windows' parts put together in order."""
        return NextTokenReference(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(NextTokenReference)))


@torch.no_grad()
def lm_fidelity(model, windows: torch.Tensor, reference: NextTokenReference | None = None,
                k: int = REFERENCE_TOP_K) -> tuple[dict[str, float], NextTokenReference]:  # fmt: skip
    """Perplexity of a causal LM on ``windows`` [n, T] (as :func:`perplexity`) and its fidelity to ``reference``,
    another model's next-token distributions on the same windows (None: this model's own, taken here), one
    window at a time. Returns (metrics, the reference used). Metrics:

    - ``perplexity``;
    - ``kl_divergence``: mean over predicted positions of KL(P_ref ‖ Q) in nats, with the reference's ``k`` most
      likely tokens apart and all other tokens as one outcome (probability p_rest = Σ of theirs, q_rest for this
      model, both from a log-sum-exp). Merging outcomes never increases a KL divergence (log-sum inequality), so
      this is a lower bound of the full KL over the vocabulary, equal to it when ``k`` covers the vocabulary
      (keeping the whole reference would take 8 × 512 × 49,152 floats for SmolLM2);
    - ``top1_agreement``: the fraction of positions whose most likely token (``argmax``) is the reference's."""
    nll = kl = 0.0
    agree = count = 0
    refs: list[NextTokenReference] = []
    for i in range(windows.shape[0]):
        x = windows[i : i + 1]
        logits = model(input_ids=x).logits.float()
        nll += _nll(logits, x)
        logq = F.log_softmax(logits[:, :-1], dim=-1)  # [1, T−1, V]
        del logits
        if reference is None:
            top = logq.topk(min(k, logq.shape[-1]), dim=-1)
            ref = NextTokenReference(top.values, top.indices, _log_rest(logq, top.indices), logq.argmax(-1))
            refs.append(ref)
        else:
            ref = reference.window(i)
        pair = ref.logp.exp() * (ref.logp - logq.gather(-1, ref.index))
        rest = ref.log_rest.exp() * (ref.log_rest - _log_rest(logq, ref.index))
        rest = torch.where(ref.log_rest > -math.inf, rest, torch.zeros_like(rest))  # 0·log 0 = 0
        kl += float(pair.sum(dtype=torch.float64) + rest.sum(dtype=torch.float64))
        agree += int((logq.argmax(-1) == ref.top1).sum())
        count += x.shape[1] - 1
    metrics = {"perplexity": math.exp(nll / count), "kl_divergence": kl / count, "top1_agreement": agree / count}
    return metrics, reference if reference is not None else NextTokenReference.cat(refs)


def _log_rest(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log Σ exp(logp) over the tokens not in ``index`` (last axis), −inf where there are none."""
    return logp.scatter(-1, index, -math.inf).logsumexp(-1)


def chunked_perplexity(model, ids: list[int] | torch.Tensor, n_ctx: int, chunks: int, bos_id: int | None) -> float:
    """Perplexity under llama.cpp's ``llama-perplexity`` protocol (``tools/perplexity/perplexity.cpp``), so a
    PyTorch model and its GGUF export are measured alike: ``ids`` (the whole text tokenized once, as
    ``llama-tokenize`` gives it) is cut into ``chunks`` consecutive windows of ``n_ctx`` tokens; each window's
    first token becomes ``bos_id`` (when the model adds a BOS); only the second half is scored: the logits at
    positions n_ctx/2 … n_ctx−2 predict tokens n_ctx/2+1 … n_ctx−1. exp of the mean negative log-likelihood
    over all scored tokens (float64 sum)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if chunks < 1 or ids.numel() < chunks * n_ctx:
        raise ValueError(f"{ids.numel()} tokens hold {ids.numel() // n_ctx} windows of {n_ctx}, {chunks} asked for")
    first = n_ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(chunks):
            window = ids[i * n_ctx : (i + 1) * n_ctx].clone()
            if bos_id is not None:
                window[0] = bos_id
            logits = model(input_ids=window[None], use_cache=False).logits[0, first:-1].float()
            nll += float(F.cross_entropy(logits, window[first + 1 :], reduction="sum").double())
            count += n_ctx - 1 - first
    return math.exp(nll / count)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(a, b).statistic)


def encoder_metrics(embed_fn, reference_embed_fn=None) -> dict[str, float]:
    """WordSim-353 Spearman, Lee-50 Pearson and (with a reference) mean cosine to the float embeddings.

    ``embed_fn(texts) -> [n, d]`` L2-normalised embeddings."""
    pairs = wordsim353()
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    index = {w: i for i, w in enumerate(words)}
    ew = embed_fn(words)
    cos_w = np.array([float(ew[index[a]] @ ew[index[b]]) for a, b, _ in pairs])
    human_w = np.array([s for _, _, s in pairs])
    docs, ratings = lee_corpus()
    ed = embed_fn(docs)
    i, j = upper_triangle_pairs(len(docs))
    cos_d = (ed @ ed.T).numpy()[i, j]
    out = {"wordsim353_spearman": _spearman(cos_w, human_w), "lee50_pearson": _pearson(cos_d, ratings[i, j])}
    if reference_embed_fn is not None:
        rw, rd = reference_embed_fn(words), reference_embed_fn(docs)
        out["embedding_cosine"] = float(torch.cat([(ew * rw).sum(1), (ed * rd).sum(1)]).mean())
    return out
