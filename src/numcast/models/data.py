"""Offline evaluation data that ships inside installed packages (see ../shared/design/assets.md).

Nothing is downloaded: every loader reads files inside the ``gensim``, ``scikit-image`` or ``scikit-learn``
wheels. Each function states its protocol (source, order, units) so results stay comparable between runs.

- :func:`wikipedia_articles`: English Wikipedia excerpt (LLM calibration / perplexity text).
- :func:`wordsim353`, :func:`lee_corpus`: word and document similarity with human ratings (encoder quality).
- :func:`natural_photos`, :func:`image_crops`: real photos and deterministic ImageNet-style crops of them
  (no ImageNet labels ship offline: compare quantized against float logits on these crops).
"""

from __future__ import annotations

import bz2
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_CHARS = 200  # an article whose cleaned text is shorter than this is dropped (none is, in this file)
LEE_N = 50

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# skimage.data RGB photographs that load without a download (scikit-image 0.26). ``cat`` is left out: it is
# the same picture as ``chelsea``. Synthetic (colorwheel, logo) and medical/microscopy images
# (immunohistochemistry, retina) are left out too.
SKIMAGE_RGB_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "rocket")
# Grayscale photographs, replicated to 3 channels.
SKIMAGE_GRAY_PHOTOS = ("camera",)


def _datapath(name: str) -> str:
    from gensim.test.utils import datapath

    return datapath(name)


def _tidy(text: str) -> str:
    """Strip trailing spaces on each line, collapse 3+ newlines to one blank line, strip the ends."""
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@lru_cache(maxsize=1)
def _wikipedia_articles() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.BZ2File(_datapath(WIKI_FILE)) as f:
        for _title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            clean = _tidy(filter_wiki(text))
            if len(clean) >= WIKI_MIN_CHARS:
                out.append(clean)
    return tuple(out)


def wikipedia_articles() -> list[str]:
    """English Wikipedia articles from the excerpt shipped in the gensim wheel, in file order.

    Protocol: ``gensim.test.utils.datapath(WIKI_FILE)`` (a bz2 MediaWiki XML dump, 206 pages) is parsed with
    ``gensim.corpora.wikicorpus.extract_pages`` keeping namespace 0 only; redirects (text starting with
    ``#REDIRECT``) are dropped; the wikitext is cleaned with ``filter_wiki`` (links, templates, tags and
    references removed; ``'''bold'''``/``''italic''`` quote marks and ``==Section==`` headings are kept);
    trailing spaces are stripped and runs of blank lines collapsed to one; articles with fewer than
    ``WIKI_MIN_CHARS`` characters are dropped. Result (gensim 4.4): 106 articles, about 3.09 M characters.
    Parsed once per process (cached); a fresh list is returned on every call.
    """
    return list(_wikipedia_articles())


def wordsim353() -> list[tuple[str, str, float]]:
    """WordSim-353 from the gensim wheel: ``(word1, word2, mean human similarity)``, in file order.

    Source ``datapath("wordsim353.tsv")``; lines starting with ``#`` (title and header) are skipped.
    Ratings are on a 0–10 scale. 353 pairs.
    """
    out = []
    with open(_datapath("wordsim353.tsv"), encoding="utf-8") as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            a, b, score = line.rstrip("\n").split("\t")[:3]
            out.append((a, b, float(score)))
    return out


def lee_corpus() -> tuple[list[str], np.ndarray]:
    """The Lee 50-document corpus and its human similarity ratings.

    Documents: ``datapath("lee.cor")``, one per line, in file order (latin-1 encoded: it holds a ``£``).
    Ratings: ``datapath("similarities0-1.txt")``, mean human similarity in [0, 1] for each document pair.
    The shipped matrix is upper-triangular (zeros below the diagonal), so it is symmetrised by mirroring
    the upper triangle; a matrix with both triangles filled is symmetrised as ``(M + M.T) / 2`` instead
    (the two agree on a symmetric input). Returns ``(docs, ratings)`` with ``ratings`` float64 ``[50, 50]``,
    symmetric, ones on the diagonal. Use :func:`upper_triangle_pairs` for the 1225 distinct pairs.
    """
    with open(_datapath("lee.cor"), encoding="latin-1") as f:
        docs = [line.strip() for line in f if line.strip()]
    m = np.loadtxt(_datapath("similarities0-1.txt"), dtype=np.float64)
    if m.shape != (LEE_N, LEE_N) or len(docs) != LEE_N:
        raise ValueError(
            f"Lee corpus: expected {LEE_N} documents and a [{LEE_N},{LEE_N}] matrix, got {len(docs)} and {m.shape}"
        )
    if not np.tril(m, -1).any():
        m = np.triu(m) + np.triu(m, 1).T
    else:
        m = (m + m.T) / 2
    return docs, m


def upper_triangle_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays ``(i, j)`` of all pairs ``i < j`` of ``n`` items, row-major (``n*(n-1)/2`` pairs)."""
    i, j = np.triu_indices(n, k=1)
    return i, j


def natural_photos() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image and scikit-learn, as ``HxWx3`` uint8 RGB arrays.

    Sources: ``skimage.data`` RGB photos :data:`SKIMAGE_RGB_PHOTOS`, the left view of
    ``skimage.data.stereo_motorcycle()`` (``"motorcycle"``), grayscale photos :data:`SKIMAGE_GRAY_PHOTOS`
    replicated to 3 channels, and ``sklearn.datasets.load_sample_images()`` (``"china"``, ``"flower"``).
    Keys are sorted by name (the dict iterates in that order). Every array is a fresh copy.
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos: dict[str, np.ndarray] = {}
    for name in SKIMAGE_RGB_PHOTOS:
        photos[name] = getattr(skimage.data, name)()
    photos["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    for name in SKIMAGE_GRAY_PHOTOS:
        photos[name] = np.repeat(getattr(skimage.data, name)()[:, :, None], 3, axis=2)
    sample = load_sample_images()
    for path, img in zip(sample.filenames, sample.images, strict=True):
        photos[path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]] = img
    out = {}
    for name in sorted(photos):
        img = np.ascontiguousarray(photos[name])
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"photo {name!r}: expected HxWx3 uint8, got {img.shape} {img.dtype}")
        out[name] = img.copy()
    return out


def resize_shorter_side(h: int, w: int, short: int) -> tuple[int, int]:
    """Output ``(h, w)`` when the shorter side becomes ``short`` (torchvision ``Resize(int)``: long side truncated)."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def center_crop_offset(h: int, w: int, size: int) -> tuple[int, int]:
    """Top-left ``(top, left)`` of a centred ``size`` crop (torchvision ``center_crop`` rounding)."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def image_crops(
    photos: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    n: int,
    size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
) -> torch.Tensor:
    """``n`` deterministic, normalised crops of ``photos``: float32 ``[n, 3, size, size]``.

    Protocol. Crop ``k`` uses photo ``k % P`` (``P`` photos, in the mapping's iteration order). Each photo
    (``HxWx3`` uint8) is converted to float32 in [0, 1] (``/ 255``), channels first, then:

    - round ``k // P == 0`` (the first ``P`` crops): the standard full-image protocol: bilinear resize so
      the shorter side is ``resize`` (long side ``int(resize * long / short)``, aspect kept), centre crop
      ``size`` (offsets rounded like torchvision's ``center_crop``);
    - later rounds: a random square region whose side is ``round(f * min(H, W))`` with ``f ~ U(0.3, 1.0)``,
      at a uniformly random integer offset inside the photo, is resized bilinearly to ``resize x resize``
      and centre cropped to ``size``.

    Resizing is ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=True)``.
    Finally each channel is normalised ``(x - mean[c]) / std[c]``. Random draws come from
    ``numpy.random.default_rng(seed)`` only, three per random crop (``f``, top, left) in ``k`` order, so the
    first ``m`` crops do not depend on ``n`` and the same seed always gives the same tensor.
    """
    imgs = list(photos.values()) if isinstance(photos, Mapping) else list(photos)
    if not imgs:
        raise ValueError("image_crops needs at least one photo")
    if n < 0 or size > resize:
        raise ValueError(f"need n >= 0 and size <= resize, got n={n}, size={size}, resize={resize}")
    rng = np.random.default_rng(seed)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    tensors = [torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0) for img in imgs]
    out = torch.empty(n, 3, size, size, dtype=torch.float32)
    for k in range(n):
        x = tensors[k % len(tensors)]
        h, w = x.shape[-2:]
        if k < len(tensors):
            oh, ow = resize_shorter_side(h, w, resize)
        else:
            side = max(1, int(round(rng.uniform(0.3, 1.0) * min(h, w))))
            top = int(rng.integers(0, h - side + 1))
            left = int(rng.integers(0, w - side + 1))
            x = x[:, top : top + side, left : left + side]
            oh, ow = resize, resize
        x = F.interpolate(x[None], size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)[0]
        t, left = center_crop_offset(oh, ow, size)
        out[k] = (x[:, t : t + size, left : left + size] - m) / s
    return out
