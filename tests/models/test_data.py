"""The offline data loaders read the shipped files with the documented protocols."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from numcast.models import data


def test_wikipedia_articles_are_the_non_redirect_main_namespace_pages():
    arts = data.wikipedia_articles()
    # The excerpt holds 206 pages: 100 are redirects (old CamelCase titles), 106 are articles.
    assert len(arts) == 106
    assert 3_000_000 < sum(map(len, arts)) < 3_200_000
    assert arts[0].startswith("'''Anarchism''' is a political philosophy")  # file order
    assert all(len(a) >= data.WIKI_MIN_CHARS for a in arts)
    assert not any(a.lower().startswith("#redirect") for a in arts)
    assert not any("\n\n\n" in a or a != a.strip() for a in arts)
    assert not any("[[" in a or "{{" in a for a in arts[:10])  # filter_wiki removed links and templates
    arts.clear()
    assert len(data.wikipedia_articles()) == 106  # the cache is not exposed


def test_wordsim353():
    pairs = data.wordsim353()
    assert len(pairs) == 353
    assert pairs[0] == ("love", "sex", 6.77)
    assert ("tiger", "tiger", 10.0) in pairs
    assert all(0.0 <= s <= 10.0 and a and b for a, b, s in pairs)


def test_lee_corpus_ratings_are_mirrored_not_halved():
    docs, sim = data.lee_corpus()
    assert len(docs) == 50
    assert docs[0].startswith("The national executive of the strife-torn Democrats")
    assert any("£" in d for d in docs)  # latin-1 decoded
    assert sim.shape == (50, 50) and sim.dtype == np.float64
    np.testing.assert_array_equal(sim, sim.T)
    np.testing.assert_array_equal(np.diag(sim), np.ones(50))
    assert sim[0, 1] == sim[1, 0] == 0.3  # the file's upper-triangle value, in both halves
    i, j = data.upper_triangle_pairs(50)
    assert len(i) == len(j) == 1225 and np.all(i < j)
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == 1225
    assert np.all((sim[i, j] > 0) & (sim[i, j] <= 1))
    i4, j4 = data.upper_triangle_pairs(4)
    assert i4.tolist() == [0, 0, 0, 1, 1, 2] and j4.tolist() == [1, 2, 3, 2, 3, 3]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return data.natural_photos()


def test_natural_photos(photos):
    assert len(photos) >= 6
    assert list(photos) == sorted(photos)
    assert {"astronaut", "coffee", "chelsea", "rocket", "china", "flower"} <= set(photos)
    for name, img in photos.items():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert min(img.shape[:2]) >= 256, name
        assert img.std() > 10, name  # a real picture, not a constant
    assert photos["chelsea"].shape == (300, 451, 3)


def _reference_full_crop(img: np.ndarray, out_hw: tuple[int, int], top_left: tuple[int, int], mean, std):
    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(torch.float32) / 255.0
    x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=True)[0]
    t, left = top_left
    x = x[:, t : t + 224, left : left + 224]
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_crop_zero_is_resize_256_center_crop_224(photos):
    sub = {k: photos[k] for k in ("chelsea", "coffee")}
    x = data.image_crops(sub, 2)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    # chelsea 300x451 -> 256x384 (int(256 * 451 / 300)), crop at (16, 80); coffee 400x600 -> 256x384
    ref = _reference_full_crop(sub["chelsea"], (256, 384), (16, 80), data.IMAGENET_MEAN, data.IMAGENET_STD)
    torch.testing.assert_close(x[0], ref, rtol=0, atol=1e-6)
    ref = _reference_full_crop(sub["coffee"], (256, 384), (16, 80), data.IMAGENET_MEAN, data.IMAGENET_STD)
    torch.testing.assert_close(x[1], ref, rtol=0, atol=1e-6)
    # normalised: every value is (v - mean) / std for some v in [0, 1]
    lo = (0 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    hi = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert torch.all(x.amin(dim=(0, 2, 3)) >= lo - 1e-5) and torch.all(x.amax(dim=(0, 2, 3)) <= hi + 1e-5)
    y = data.image_crops(sub, 1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(y[0], _reference_full_crop(sub["chelsea"], (256, 384), (16, 80), [0.5] * 3, [0.5] * 3))


def test_crops_are_deterministic_varied_and_prefix_stable(photos):
    sub = {k: photos[k] for k in ("astronaut", "chelsea")}
    a = data.image_crops(sub, 8, size=32, resize=40, seed=0)
    assert a.shape == (8, 3, 32, 32)
    assert torch.equal(a, data.image_crops(sub, 8, size=32, resize=40, seed=0))
    assert torch.equal(a[:5], data.image_crops(sub, 5, size=32, resize=40, seed=0))
    b = data.image_crops(sub, 8, size=32, resize=40, seed=1)
    assert torch.equal(a[:2], b[:2])  # round 0 is the fixed full-image protocol
    assert all(not torch.allclose(a[k], b[k]) for k in range(2, 8))
    # many different crops of the same photo
    for p in range(2):
        crops = a[p::2]
        assert all(not torch.allclose(crops[u], crops[v]) for u in range(4) for v in range(u))


def test_crops_do_not_touch_the_global_rng(photos):
    state = np.random.get_state()  # noqa: NPY002 (reads the legacy global RNG on purpose)
    torch_state = torch.random.get_rng_state()
    data.image_crops({"coffee": photos["coffee"]}, 3, size=16, resize=20, seed=3)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()  # noqa: NPY002
    assert all(np.array_equal(u, v) for u, v in zip(after, state, strict=True))
