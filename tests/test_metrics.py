"""Chapter 12a (and the metrics of 12b): FID, the Inception Score, KID and the image protocol, against independent
computations: `scipy.linalg.sqrtm` (pytorch-fid's route) for the Fréchet distance, probabilities and `scipy.special`
for the Inception Score, loops for KID and the resize. No network here (see test_inception.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from hitlib import data, inception
from hitlib.reference import metrics as ref


def _gaussian_statistics(rng, num_samples, dim, shift=0.0):
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return ref.feature_statistics(shift + rng.standard_normal((num_samples, dim)) @ mix)


def _frechet_sqrtm(mu1, sigma1, mu2, sigma2):
    "The textbook formula with scipy.linalg.sqrtm of the product, written here independently of the library."
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


@settings(max_examples=15)
@given(st.integers(3, 400), st.integers(1, 48), st.floats(0.0, 2.0), st.integers(0, 2**16))
def test_frechet_distance_matches_scipy_sqrtm(num_samples, dim, shift, seed):
    rng = np.random.default_rng(seed)
    a = _gaussian_statistics(rng, num_samples, dim)
    b = _gaussian_statistics(rng, num_samples + 7, dim, shift)
    expected = _frechet_sqrtm(*a, *b)
    scale = np.trace(a[1]) + np.trace(b[1])  # the terms that cancel; sqrtm itself is accurate to ~1e-8 of them
    assert abs(ref.frechet_distance(*a, *b) - expected) <= 1e-7 * scale
    assert abs(ref.frechet_distance_sqrtm(*a, *b) - expected) <= 1e-9 * scale
    with jax.enable_x64(True):  # the JAX code on the same float64 statistics
        ours = float(inception.frechet_distance(*(jnp.asarray(s, jnp.float64) for s in (*a, *b))))
    assert abs(ours - expected) <= 1e-7 * scale


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(ref.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4 + 1, rtol=1e-12)
    a, b = rng.uniform(0.1, 2, 20), rng.uniform(0.1, 2, 20)
    m1, m2 = rng.standard_normal(20), rng.standard_normal(20)
    np.testing.assert_allclose(ref.frechet_distance(m1, np.diag(a), m2, np.diag(b)),
                               np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rtol=1e-10)
    stats = _gaussian_statistics(rng, 500, 32)
    assert abs(ref.frechet_distance(*stats, *stats)) < 1e-10 * np.trace(stats[1])


def test_frechet_distance_float32_jax_is_within_rounding():
    rng = np.random.default_rng(1)
    a, b = _gaussian_statistics(rng, 600, 64), _gaussian_statistics(rng, 500, 64, 0.1)
    expected = _frechet_sqrtm(*a, *b)
    ours = float(jax.jit(inception.frechet_distance)(*(jnp.asarray(s, jnp.float32) for s in (*a, *b))))
    assert abs(ours - expected) < 3e-5 * (np.trace(a[1]) + np.trace(b[1]))  # float32: see chapter 12b


def _inception_score_direct(logits, num_splits):
    "Salimans et al.'s definition with probabilities: exp(mean_x KL(p(y|x) || p(y))) per split; mean and std."
    probs = scipy.special.softmax(np.asarray(logits, np.float64), axis=1)
    scores = []
    n = len(probs)
    for part in (probs[i * n // num_splits:(i + 1) * n // num_splits] for i in range(num_splits)):  # the reference's
        # split boundaries (Salimans et al.'s code), which np.array_split does not reproduce when N % splits != 0
        marginal = part.mean(axis=0, keepdims=True)
        kl = scipy.special.rel_entr(part, marginal).sum(axis=1)  # p log(p / q), 0 where p = 0
        scores.append(np.exp(kl.mean()))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("num_samples, num_classes, num_splits, scale", [
    (100, 1008, 10, 3.0), (57, 10, 4, 10.0), (20, 7, 1, 0.1), (30, 1008, 3, 30.0)])
def test_inception_score_matches_the_direct_computation(num_samples, num_classes, num_splits, scale):
    logits = np.random.default_rng(num_samples).normal(0, scale, (num_samples, num_classes))
    expected = _inception_score_direct(logits, num_splits)
    np.testing.assert_allclose(ref.inception_score(logits, num_splits), expected, rtol=1e-9, atol=1e-12)
    ours = inception.inception_score(jnp.asarray(logits, jnp.float32), num_splits)  # float32 JAX
    np.testing.assert_allclose(np.asarray(ours, np.float64), expected, rtol=1e-4, atol=1e-5 * expected[0])


def test_inception_score_limits():
    np.testing.assert_allclose(ref.inception_score(np.zeros((20, 1008)), 2), (1.0, 0.0), atol=1e-12)
    certain = 60.0 * np.eye(10)[np.arange(200) % 10]  # each class equally often, p(y|x) ≈ one-hot
    np.testing.assert_allclose(ref.inception_score(certain, 4)[0], 10.0, rtol=1e-9)


def test_kid_matches_loops_and_is_unbiased_on_average():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((12, 5)), 0.3 + rng.standard_normal((9, 5))
    np.testing.assert_allclose(ref.mmd2_unbiased(x, y), ref.mmd2_unbiased_loops(x, y), rtol=1e-12)
    same = [ref.mmd2_unbiased(rng.standard_normal((40, 8)), rng.standard_normal((40, 8))) for _ in range(200)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))


def test_the_protocol_quantises_with_to_uint8():
    """Chapter 12a's quantisation is `data.to_uint8` (one function, also used by `evaluate_generator`): exact
    rounding of the clipped values up to float32 ties, clipping, and the same levels for a NumPy or a JAX array."""
    images = np.random.default_rng(3).uniform(-1.2, 1.2, (8, 16, 16, 3)).astype(np.float32)
    exact = np.round((np.clip(images.astype(np.float64), -1, 1) + 1) * 127.5)  # written independently, float64
    levels = data.to_uint8(images)
    assert levels.dtype == np.uint8
    # float32 arithmetic: one level off only within ~1e-5 of a rounding tie
    assert np.abs(levels - exact).max() <= 1 and (levels != exact).mean() < 1e-3
    inside = np.abs(images) <= 1
    assert np.abs(levels / 127.5 - 1 - images)[inside].max() <= 1 / 255 + 1e-7  # half a level
    assert levels[images > 1].min() == 255 and levels[images < -1].max() == 0  # clipped, never wrapped
    from_device = np.asarray(data.to_uint8(jnp.asarray(images)))  # a generator's output
    assert from_device.dtype == np.uint8
    np.testing.assert_array_equal(from_device, levels)


@settings(max_examples=10)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 20), st.integers(1, 20), st.integers(0, 2**16))
def test_resize_matches_loops(in_h, in_w, out_h, out_w, seed):
    images = np.random.default_rng(seed).uniform(0, 1, (2, in_h, in_w, 3))
    np.testing.assert_allclose(ref.resize_bilinear(images, out_h, out_w),
                               ref.resize_bilinear_loops(images, out_h, out_w), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("call, message", [
    (lambda: ref.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)), "covariance must be [D, D]"),
    (lambda: ref.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "same feature width"),
    (lambda: ref.inception_score(np.zeros((5, 10)), 6), "num_splits must be an integer in [1, N=5]"),
    (lambda: ref.preprocess_images(np.zeros((1, 8, 8, 3), np.float32)), "must be uint8"),
    (lambda: ref.kid_subset_indices(10, 10, num_subsets=0, subset_size=5), "num_subsets must be a positive integer, got num_subsets=0"),
    (lambda: ref.kid_subset_indices(10, 10, subset_size=1), "subset_size must be an integer >= 2, got subset_size=1"),
    (lambda: ref.kid_subset_indices(10, 10, subset_size=11), "subset_size must be an integer in [2, min(N_a, N_b)] = [2, 10]"),
    (lambda: ref.inception_score(np.zeros((5, 10)), 2.0), "num_splits must be a positive integer, got num_splits=2.0"),
])
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)
