"""Chapter 5 (high-resolution stages, Algorithm 1; Table 8 left): dense, GELU, LN/BN, BN's running
statistics (Keras' unbiased variance), MLP block, to-RGB, skip image and stage transition — NumPy vs
naive loops, JAX vs NumPy, norm properties, jit/grad, bad input."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from hitlib import layers
from hitlib.reference import layers as ref
from hitlib.reference.blocking import pixel_shuffle, upsample_nearest

RTOL = 1e-5  # float32 parity; atol = RTOL * max|expected| where values cross zero


# parity needs true float32 products (conftest.py)
pytestmark = pytest.mark.usefixtures("full_float32_precision")


def to_jax(tree):
    return None if tree is None else jax.tree.map(jnp.asarray, tree)


def assert_parity(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(np.abs(expected).max(), 1e-30))


@st.composite
def token_maps(draw, min_rank=2):
    "A float32 array [B, ..., C] (rank 2 to 4, small), a random offset/scale per channel, and a seed."
    rank = draw(st.integers(min_rank, 4))
    shape = tuple(draw(st.integers(1, 3)) for _ in range(rank - 1)) + (draw(st.integers(1, 6)),)
    seed = draw(st.integers(0, 2**16))
    r = np.random.default_rng(seed)
    x = (r.standard_normal(shape) * r.uniform(0.2, 3, shape[-1]) + r.normal(0, 2, shape[-1])).astype(np.float32)
    return x, seed


kinds = st.sampled_from(ref.NORM_KINDS)


# ---------------------------------------------------------------- NumPy vs naive loops


@given(token_maps(min_rank=1), st.integers(1, 5))
def test_dense_matches_loops(case, c_out):
    x, seed = case
    params = ref.init_dense(np.random.default_rng(seed), x.shape[-1], c_out, bias_std=0.5)
    params["kernel"] *= 50
    y = ref.dense(x, params)
    assert y.shape == x.shape[:-1] + (c_out,) and y.dtype == np.float32
    expected = ref.dense_loops(x, params)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_gelu_matches_loops_and_definition():
    x = np.linspace(-6, 6, 241)
    np.testing.assert_allclose(ref.gelu(x), ref.gelu_loops(x), rtol=1e-12, atol=1e-15)
    phi = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])  # standard normal CDF
    np.testing.assert_allclose(ref.gelu(x), x * phi, rtol=1e-12, atol=1e-15)
    assert ref.gelu(np.float32(1.0)).dtype == np.float32
    # erfc form is accurate in float32 where 1 + erf cancels
    t = np.float32(-5.0)
    assert abs(ref.gelu(t) / ref.gelu_loops(-5.0) - 1) < 1e-5


def test_gelu_tanh_is_close_but_not_equal():
    x = np.linspace(-5, 5, 1001)
    difference = np.abs(ref.gelu_tanh(x) - ref.gelu(x)).max()
    assert 1e-4 < difference < 1e-3
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    literal = 0.5 * x * (1 + np.tanh(u))  # the textbook form, float64
    np.testing.assert_allclose(ref.gelu_tanh(x), literal, rtol=1e-9, atol=1e-15)
    # float32: the sigmoid form keeps its relative accuracy where 1 + tanh(u) cancels
    t = np.float32(-3.5399356)
    u64 = math.sqrt(2 / math.pi) * (float(t) + 0.044715 * float(t) ** 3)
    assert abs(ref.gelu_tanh(t) / (float(t) / (1 + math.exp(-2 * u64))) - 1) < 1e-5
    assert ref.gelu_tanh(t).dtype == np.float32


@given(token_maps(), kinds, st.booleans())
def test_norms_match_loops(case, kind, running):
    x, seed = case
    params = ref.init_norm(np.random.default_rng(seed), x.shape[-1], kind, random=True)
    y = ref.normalize(x, params, kind, use_running_average=running)
    if kind == "layer":
        expected = ref.layer_norm_loops(x, params)
    else:
        expected = ref.batch_norm_loops(x, params, use_running_average=running)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


@given(token_maps(), kinds, st.booleans())
def test_mlp_block_matches_loops(case, kind, running):
    x, seed = case
    params = ref.init_mlp_block(np.random.default_rng(seed), x.shape[-1], kind, random_norm=True, bias_std=0.2)
    params["hidden"]["kernel"] *= 20
    params["output"]["kernel"] *= 20
    y = ref.mlp_block(x, params, kind, running)
    expected = ref.mlp_block_loops(x, params, kind, running)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


@given(token_maps(), st.sampled_from([0.99, 0.9, 0.0, 1.0]))
def test_batch_norm_running_update_matches_loops(case, momentum):
    "float64 against Python sums, the variance divided by n - 1 directly: rtol 1e-12 (atol 1e-12 near 0)."
    x, seed = case
    assume(math.prod(x.shape[:-1]) >= 2)
    x = x.astype(np.float64)
    norm = ref.init_norm(np.random.default_rng(seed), x.shape[-1], "batch", random=True)
    running = {key: norm[key].astype(np.float64) for key in ("mean", "var")}
    new = ref.batch_norm_running_update(x, running, momentum)
    expected = ref.batch_norm_running_update_loops(x, running, momentum)
    assert set(new) == set(expected) == {"mean", "var"}
    for key in new:
        assert new[key].shape == (x.shape[-1],) and new[key].dtype == np.float64
        np.testing.assert_allclose(new[key], expected[key], rtol=1e-12, atol=1e-12)


def test_batch_norm_running_update_is_keras_rule_with_unbiased_variance():
    """moving = m·moving + (1 - m)·batch statistic (Keras' BatchNormalization), with the batch's mean and
    its unbiased variance, n/(n - 1) times the biased variance that the normalisation divides by.
    float64: rtol 1e-12."""
    r = np.random.default_rng(3)
    x = r.standard_normal((2, 3, 5)) * 2 + 1  # n = 6 values per channel: factor 6/5
    params = {"scale": np.ones(5), "bias": np.zeros(5),
              "mean": r.standard_normal(5), "var": r.uniform(0.5, 2, 5)}
    original = {key: value.copy() for key, value in params.items()}
    new = ref.batch_norm_running_update(x, params)  # a batch norm's params will do; scale, bias ignored
    assert set(new) == {"mean", "var"}
    assert all(np.array_equal(params[key], original[key]) for key in params)  # pure: nothing updated in place
    mean, biased = ref.batch_moments(x)
    n, m = 6, 0.99
    np.testing.assert_allclose(new["mean"], m * params["mean"] + (1 - m) * mean, rtol=1e-12)
    np.testing.assert_allclose(new["var"], m * params["var"] + (1 - m) * biased * n / (n - 1), rtol=1e-12)
    unbiased = x.reshape(-1, 5).var(0, ddof=1)
    np.testing.assert_allclose(new["var"], m * params["var"] + (1 - m) * unbiased, rtol=1e-12)
    gap = new["var"] - (m * params["var"] + (1 - m) * biased)  # what the biased update would have missed
    np.testing.assert_allclose(gap, (1 - m) * biased / (n - 1), rtol=1e-9)
    assert np.all(gap > 1e-3 * biased)
    # the normalisation keeps the biased variance: the output's variance is var / (var + eps)
    y = ref.batch_norm(x, params)
    np.testing.assert_allclose(y.reshape(-1, 5).var(0), biased / (biased + 1e-3), rtol=1e-9)
    kept = ref.batch_norm_running_update(x, params, 1.0)
    replaced = ref.batch_norm_running_update(x, params, 0)
    np.testing.assert_array_equal(kept["var"], params["var"])
    np.testing.assert_allclose(replaced["var"], biased * 1.2, rtol=1e-12)


def test_init_shapes_and_values():
    r = np.random.default_rng(0)
    p = ref.init_mlp_block(r, 8, "batch")
    assert p["hidden"]["kernel"].shape == (8, 32) and p["output"]["kernel"].shape == (32, 8)
    assert np.all(np.abs(p["hidden"]["kernel"]) <= 0.04) and np.all(p["hidden"]["bias"] == 0)
    assert 0.015 < p["output"]["kernel"].std() < 0.02  # truncated at 2 stddev: std 0.88 * 0.02
    np.testing.assert_array_equal(p["norm"]["scale"], 1)
    np.testing.assert_array_equal(p["norm"]["var"], 1)
    assert set(ref.init_norm(r, 4, "layer")) == {"scale", "bias"}
    q = ref.init_norm(r, 64, "batch", random=True)
    assert np.all(q["var"] > 0) and all(np.all(v != 0) for v in q.values())
    assert all(v.dtype == np.float32 for v in q.values())
    assert ref.init_to_rgb(r, 8, "layer")["dense"]["kernel"].shape == (8, 3)
    assert ref.init_stage_transition(r, 16, 4) is None
    assert ref.init_stage_transition(r, 128, 64)["kernel"].shape == (32, 64)


# ---------------------------------------------------------------- properties of the norms


@given(token_maps())
def test_batch_norm_training_output_is_standardised_per_channel(case):
    x, seed = case
    x = x.astype(np.float64)
    n = x.size // x.shape[-1]
    params = ref.init_norm(np.random.default_rng(seed), x.shape[-1], "batch", random=True)
    params = {k: v.astype(np.float64) for k, v in params.items()}
    y = ref.batch_norm(x, params, eps=1e-3)
    x_hat = (y - params["bias"]) / params["scale"]  # undo scale and bias
    flat, var = x_hat.reshape(n, -1), x.reshape(n, -1).var(0)
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(flat.var(0), var / (var + 1e-3), rtol=1e-9, atol=1e-12)  # 1, up to eps
    mean, moment_var = ref.batch_moments(x)
    np.testing.assert_allclose(mean, x.reshape(n, -1).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moment_var, var, rtol=1e-12, atol=1e-15)


def test_batch_norm_standardises_large_batches():
    x = np.random.default_rng(0).standard_normal((8, 16, 16, 4)) * [1, 5, 0.1, 20] + [0, -3, 7, 100]
    y = ref.batch_norm(x, ref.init_norm(None, 4, "batch"))
    np.testing.assert_allclose(y.reshape(-1, 4).mean(0), 0, atol=1e-9)
    var = y.reshape(-1, 4).var(0)
    np.testing.assert_allclose(var[[0, 1, 3]], 1, atol=2e-3)
    assert 0.85 < var[2] < 0.95  # channel 2 has variance ~0.01: eps = 1e-3 is not negligible there


@given(token_maps(min_rank=1))
def test_layer_norm_invariant_to_per_token_shift_and_scale(case):
    x, seed = case
    r = np.random.default_rng(seed)
    x = x.astype(np.float64)
    if x.shape[-1] < 2:
        x = np.concatenate([x, x + 1], -1)
    params = {k: v.astype(np.float64) for k, v in ref.init_norm(r, x.shape[-1], "layer", random=True).items()}
    scale = r.uniform(0.5, 4, x.shape[:-1] + (1,))
    shift = r.normal(0, 5, x.shape[:-1] + (1,))
    np.testing.assert_allclose(ref.layer_norm(scale * x + shift, params, eps=1e-12),
                               ref.layer_norm(x, params, eps=1e-12), rtol=1e-7, atol=1e-7)
    y = ref.layer_norm(x, {"scale": np.ones(x.shape[-1]), "bias": np.zeros(x.shape[-1])}, eps=1e-12)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-9)
    spread = x.var(-1) > 1e-6  # tokens whose features are not all equal
    np.testing.assert_allclose(y.var(-1)[spread], 1, rtol=1e-6)


def test_batch_norm_couples_the_batch_only_in_training_mode():
    r = np.random.default_rng(1)
    x = r.standard_normal((3, 2, 2, 5))
    other = x.copy()
    other[1:] = r.standard_normal(other[1:].shape)
    params = ref.init_norm(r, 5, "batch", random=True)
    assert np.abs(ref.batch_norm(x, params)[0] - ref.batch_norm(other, params)[0]).max() > 0.01
    np.testing.assert_array_equal(ref.batch_norm(x, params, use_running_average=True)[0],
                                  ref.batch_norm(other, params, use_running_average=True)[0])
    np.testing.assert_array_equal(ref.layer_norm(x, ref.init_norm(r, 5, "layer"))[0],
                                  ref.layer_norm(other, ref.init_norm(r, 5, "layer"))[0])


def test_batch_norm_inference_uses_running_statistics():
    r = np.random.default_rng(2)
    x = r.standard_normal((2, 3, 4))
    params = ref.init_norm(r, 4, "batch", random=True)
    expected = (x - params["mean"]) / np.sqrt(params["var"] + 1e-3) * params["scale"] + params["bias"]
    np.testing.assert_allclose(ref.batch_norm(x, params, use_running_average=True), expected, rtol=1e-6)


def test_normalize_default_eps():
    x = np.random.default_rng(3).standard_normal((2, 3, 4)) * 0.01  # variance comparable to eps
    for kind, eps in (("batch", 1e-3), ("layer", 1e-6)):
        params = ref.init_norm(None, 4, kind)
        expected = ref.batch_norm(x, params, eps) if kind == "batch" else ref.layer_norm(x, params, eps)
        np.testing.assert_array_equal(ref.normalize(x, params, kind), expected)
        other = ref.normalize(x, params, kind, eps=0.5)
        assert np.abs(other - expected).max() > 1e-3  # eps is honoured


# ---------------------------------------------------------------- to-RGB, skip image, transition


def test_mlp_block_is_per_token_under_layer_norm():
    r = np.random.default_rng(4)
    x = r.standard_normal((2, 4, 4, 8)).astype(np.float32)
    params = ref.init_mlp_block(r, 8, "layer", random_norm=True, bias_std=0.1)
    y = ref.mlp_block(x, params, "layer")
    for b, h, w in ((0, 0, 0), (1, 2, 3)):
        np.testing.assert_allclose(ref.mlp_block(x[b:b + 1, h:h + 1, w:w + 1], params, "layer")[0, 0, 0], y[b, h, w],
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ref.NORM_KINDS)
def test_to_rgb_rgb_skip_and_transition(kind):
    r = np.random.default_rng(5)
    x = r.standard_normal((2, 4, 6, 16)).astype(np.float32)
    p = ref.init_to_rgb(r, 16, kind, random_norm=True, bias_std=0.1)
    rgb = ref.to_rgb(x, p, kind)
    assert rgb.shape == (2, 4, 6, 3)
    norm_loops = ref.layer_norm_loops(x, p["norm"]) if kind == "layer" else ref.batch_norm_loops(x, p["norm"])
    np.testing.assert_allclose(rgb, ref.dense_loops(norm_loops, p["dense"]), rtol=RTOL, atol=RTOL * np.abs(rgb).max())
    previous = r.standard_normal((2, 2, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(ref.rgb_skip(previous, rgb), upsample_nearest(previous) + rgb)
    np.testing.assert_array_equal(ref.rgb_skip(None, rgb), rgb)
    np.testing.assert_array_equal(ref.stage_transition(x, None), pixel_shuffle(x))
    t = ref.init_stage_transition(r, 16, 7, bias_std=0.1)
    y = ref.stage_transition(x, t)
    assert y.shape == (2, 8, 12, 7)
    np.testing.assert_allclose(y, ref.dense_loops(pixel_shuffle(x), t), rtol=RTOL, atol=RTOL * np.abs(y).max())


def test_three_stage_image_accumulation():
    "Algorithm 1: I_3 = up(up(RGB_1)) + up(RGB_2) + RGB_3, whatever the features."
    r = np.random.default_rng(6)
    rgbs = [r.standard_normal((1, s, s, 3)).astype(np.float32) for s in (8, 16, 32)]
    image = None
    for rgb in rgbs:
        image = ref.rgb_skip(image, rgb)
    expected = upsample_nearest(upsample_nearest(rgbs[0])) + upsample_nearest(rgbs[1]) + rgbs[2]
    np.testing.assert_allclose(image, expected, rtol=1e-6)


# ---------------------------------------------------------------- JAX vs NumPy


# One jitted function per test traces every JAX layer at once: one compilation per drawn shape instead of one per
# primitive (eager mode), which keeps these property tests fast. `test_jax_eager_equals_numpy` covers eager mode.


@functools.partial(jax.jit, static_argnames=("kind", "running"))
def _jax_norm_outputs(x, norm_params, mlp_params, kind, running):
    out = {"normalize": layers.normalize(x, norm_params, kind, use_running_average=running),
           "mlp_block": layers.mlp_block(x, mlp_params, kind, running)}
    if kind == "batch":
        out["mean"], out["var"] = layers.batch_moments(x)
        out["batch_norm"] = layers.batch_norm(x, norm_params, use_running_average=running)
    else:
        out["layer_norm"] = layers.layer_norm(x, norm_params)
    return out


@given(token_maps(), kinds, st.booleans())
def test_jax_norms_and_mlp_block_equal_numpy(case, kind, running):
    x, seed = case
    r = np.random.default_rng(seed)
    norm_params = ref.init_norm(r, x.shape[-1], kind, random=True)
    mlp_params = ref.init_mlp_block(r, x.shape[-1], kind, random_norm=True, bias_std=0.2)
    actual = _jax_norm_outputs(jnp.asarray(x), to_jax(norm_params), to_jax(mlp_params), kind=kind, running=running)
    expected = {"normalize": ref.normalize(x, norm_params, kind, use_running_average=running),
                "mlp_block": ref.mlp_block(x, mlp_params, kind, running)}
    if kind == "batch":
        expected["mean"], expected["var"] = ref.batch_moments(x)
        expected["batch_norm"] = ref.batch_norm(x, norm_params, use_running_average=running)
    else:
        expected["layer_norm"] = ref.layer_norm(x, norm_params)
    assert set(actual) == set(expected)
    for name in expected:
        assert_parity(actual[name], expected[name])


@jax.jit
def _jax_dense_gelu_outputs(x, params):
    return layers.dense(x, params), layers.gelu(x), layers.gelu_tanh(x)


@given(token_maps(min_rank=1), st.integers(1, 5))
def test_jax_dense_and_gelu_equal_numpy(case, c_out):
    x, seed = case
    params = ref.init_dense(np.random.default_rng(seed), x.shape[-1], c_out, bias_std=0.5)
    actual = _jax_dense_gelu_outputs(jnp.asarray(x), to_jax(params))
    for a, e in zip(actual, (ref.dense(x, params), ref.gelu(x), ref.gelu_tanh(x))):
        assert_parity(a, e)


@functools.partial(jax.jit, static_argnames=("kind",))
def _jax_image_outputs(x, rgb_params, image, rgb, transition, kind):
    return (layers.to_rgb(x, rgb_params, kind), layers.rgb_skip(image, rgb), layers.rgb_skip(None, rgb),
            layers.stage_transition(x, transition))


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.sampled_from([4, 8, 16]), st.integers(1, 6),
       kinds, st.integers(0, 2**16))
def test_jax_to_rgb_skip_and_transition_equal_numpy(batch, height, width, channels, c_next, kind, seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal((batch, height, width, channels)).astype(np.float32)
    p_rgb = ref.init_to_rgb(r, channels, kind, random_norm=True, bias_std=0.1)
    rgb = r.standard_normal((batch, 2 * height, 2 * width, 3)).astype(np.float32)
    image = r.standard_normal((batch, height, width, 3)).astype(np.float32)
    t = ref.init_stage_transition(r, channels, c_next, bias_std=0.1)
    out = ref.stage_transition(x, t)
    assert out.shape == (batch, 2 * height, 2 * width, c_next)
    to_rgb, skip, start, transition = _jax_image_outputs(jnp.asarray(x), to_jax(p_rgb), jnp.asarray(image),
                                                         jnp.asarray(rgb), to_jax(t), kind=kind)
    assert_parity(to_rgb, ref.to_rgb(x, p_rgb, kind))
    np.testing.assert_array_equal(np.asarray(skip), ref.rgb_skip(image, rgb))  # data movement and one add: exact
    np.testing.assert_array_equal(np.asarray(start), rgb)
    if t is None:
        np.testing.assert_array_equal(np.asarray(transition), out)
    else:
        assert_parity(transition, out)


@pytest.mark.parametrize("kind", ref.NORM_KINDS)
def test_jax_eager_equals_numpy(kind):
    "Every JAX function outside jit, on one fixed shape."
    r = np.random.default_rng(12)
    x = r.standard_normal((2, 2, 4, 8)).astype(np.float32)
    xj = jnp.asarray(x)
    p_norm = ref.init_norm(r, 8, kind, random=True)
    p_mlp = ref.init_mlp_block(r, 8, kind, random_norm=True, bias_std=0.1)
    p_rgb = ref.init_to_rgb(r, 8, kind, random_norm=True, bias_std=0.1)
    p_dense = ref.init_dense(r, 8, 5, bias_std=0.1)
    t = ref.init_stage_transition(r, 8, 4, bias_std=0.1)
    assert_parity(layers.dense(xj, to_jax(p_dense)), ref.dense(x, p_dense))
    assert_parity(layers.gelu(xj), ref.gelu(x))
    assert_parity(layers.gelu_tanh(xj), ref.gelu_tanh(x))
    for running in (False, True):
        assert_parity(layers.normalize(xj, to_jax(p_norm), kind, use_running_average=running),
                      ref.normalize(x, p_norm, kind, use_running_average=running))
        assert_parity(layers.mlp_block(xj, to_jax(p_mlp), kind, running), ref.mlp_block(x, p_mlp, kind, running))
        assert_parity(layers.to_rgb(xj, to_jax(p_rgb), kind, running), ref.to_rgb(x, p_rgb, kind, running))
    if kind == "batch":
        for running in (False, True):
            assert_parity(layers.batch_norm(xj, to_jax(p_norm), use_running_average=running),
                          ref.batch_norm(x, p_norm, use_running_average=running))
        for a, e in zip(layers.batch_moments(xj), ref.batch_moments(x)):
            assert_parity(a, e)
    else:
        assert_parity(layers.layer_norm(xj, to_jax(p_norm)), ref.layer_norm(x, p_norm))
    assert_parity(layers.stage_transition(xj, to_jax(t)), ref.stage_transition(x, t))
    np.testing.assert_array_equal(np.asarray(layers.stage_transition(xj, None)), ref.stage_transition(x, None))
    rgb = ref.to_rgb(x, p_rgb, kind)
    image = r.standard_normal((2, 1, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(layers.rgb_skip(jnp.asarray(image), jnp.asarray(rgb))),
                                  ref.rgb_skip(image, rgb))


@pytest.mark.parametrize("kind", ref.NORM_KINDS)
def test_jax_bfloat16_keeps_dtype_and_float32_statistics(kind):
    "bfloat16 in, bfloat16 out; the norms' statistics in float32, so only the output rounding (2^-8) is lost."
    r = np.random.default_rng(7)
    x = jnp.asarray(r.standard_normal((2, 16, 16, 8)) * 3 + 100, jnp.bfloat16)  # large offset: bf16 sums would drift
    p_norm = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), ref.init_norm(r, 8, kind, random=True))
    x32, p32 = np.asarray(x, np.float32), jax.tree.map(lambda a: np.asarray(a, np.float32), p_norm)
    for running in (False, True):
        y = layers.normalize(x, p_norm, kind, use_running_average=running)
        assert y.dtype == jnp.bfloat16
        expected = ref.normalize(x32, p32, kind, use_running_average=running)
        np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=2**-8, atol=2**-8 * np.abs(expected).max())
    mean, var = layers.batch_moments(x)
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(mean), ref.batch_moments(x32)[0], rtol=1e-6)
    p_mlp = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), ref.init_mlp_block(r, 8, kind))
    assert layers.mlp_block(x, p_mlp, kind).dtype == jnp.bfloat16


@jax.jit
def _jax_running_update(x, running):
    return layers.batch_norm_running_update(x, running)


@given(token_maps())
def test_jax_batch_norm_running_update_equals_numpy(case):
    "float32 parity: rtol 1e-5 (atol 1e-5 × max|expected| for means near zero)."
    x, seed = case
    assume(math.prod(x.shape[:-1]) >= 2)
    running = ref.init_norm(np.random.default_rng(seed), x.shape[-1], "batch", random=True)
    actual = _jax_running_update(jnp.asarray(x), to_jax(running))
    expected = ref.batch_norm_running_update(x, running)
    assert set(actual) == set(expected) == {"mean", "var"}
    for key in expected:
        assert_parity(actual[key], expected[key])


def test_jax_batch_norm_running_update_eager_momentum_and_bfloat16():
    r = np.random.default_rng(11)
    x = (r.standard_normal((4, 8, 8, 6)) * 3 + 2).astype(np.float32)
    running = ref.init_norm(r, 6, "batch", random=True)
    for momentum in (0.99, 0.9, 0.0):
        actual = layers.batch_norm_running_update(jnp.asarray(x), to_jax(running), momentum)
        expected = ref.batch_norm_running_update(x, running, momentum)
        for key in expected:
            assert_parity(actual[key], expected[key])  # rtol 1e-5
    xb = jnp.asarray(x, jnp.bfloat16)
    actual = layers.batch_norm_running_update(xb, to_jax(running))  # bfloat16 values, float32 statistics
    expected = ref.batch_norm_running_update(np.asarray(xb, np.float32), running)
    for key in expected:
        assert actual[key].dtype == jnp.float32
        assert_parity(actual[key], expected[key])  # rtol 1e-5


# ---------------------------------------------------------------- jit and grad


def test_jit():
    r = np.random.default_rng(9)
    x = r.standard_normal((2, 4, 4, 8)).astype(np.float32)
    params = ref.init_mlp_block(r, 8, "batch", random_norm=True, bias_std=0.1)
    jitted = jax.jit(layers.mlp_block, static_argnames=("norm", "use_running_average"))
    for running in (False, True):
        assert_parity(jitted(jnp.asarray(x), to_jax(params), norm="batch", use_running_average=running),
                      ref.mlp_block(x, params, "batch", running))
    t = ref.init_stage_transition(r, 8, 4, bias_std=0.1)
    assert_parity(jax.jit(layers.stage_transition)(jnp.asarray(x), to_jax(t)), ref.stage_transition(x, t))
    image = r.standard_normal((2, 2, 2, 3)).astype(np.float32)
    rgb = ref.to_rgb(x, ref.init_to_rgb(r, 8, "layer"), "layer")
    np.testing.assert_array_equal(np.asarray(jax.jit(layers.rgb_skip)(jnp.asarray(image), jnp.asarray(rgb))),
                                  ref.rgb_skip(image, rgb))


@pytest.mark.parametrize("norm, running", [("batch", False), ("batch", True), ("layer", False)])
def test_grad_of_mlp_block_matches_finite_differences(norm, running):
    "jax.grad in float64 against central differences of the float64 NumPy oracle, for x and every parameter."
    r = np.random.default_rng(10)
    x = r.standard_normal((2, 2, 2, 3))
    params = jax.tree.map(lambda a: a.astype(np.float64), ref.init_mlp_block(r, 3, norm, random_norm=True, bias_std=0.3))
    params["hidden"]["kernel"] *= 25
    params["output"]["kernel"] *= 25
    weights = r.standard_normal(x.shape)

    def loss_np(x, params):
        return float(np.sum(weights * ref.mlp_block(x, params, norm, running)))

    with jax.enable_x64(True):
        grads = jax.grad(lambda x, p: jnp.sum(jnp.asarray(weights) * layers.mlp_block(x, p, norm, running)),
                         argnums=(0, 1))(jnp.asarray(x), to_jax(params))
        gx, gp = np.asarray(grads[0]), jax.tree.map(np.asarray, grads[1])
    h = 1e-6
    leaves = [(x, gx)] + [(params[a][b], gp[a][b]) for a in params for b in params[a]
                          if running or b not in ("mean", "var")]
    for value, grad in leaves:
        numeric = np.zeros(value.shape)
        for i in np.ndindex(value.shape):
            old = value[i]
            value[i] = old + h
            up = loss_np(x, params)
            value[i] = old - h
            down = loss_np(x, params)
            value[i] = old
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6 * np.abs(numeric).max())
    if not running:
        np.testing.assert_array_equal(gp["norm"].get("mean", 0), 0)  # training mode ignores running statistics


def test_grad_of_stage_transition_and_rgb_skip():
    r = np.random.default_rng(11)
    x = r.standard_normal((1, 2, 2, 8)).astype(np.float32)
    t = ref.init_stage_transition(r, 8, 3, bias_std=0.1)
    w = r.standard_normal((1, 4, 4, 3)).astype(np.float32)
    # d/dx sum(w * dense(pixel_shuffle(x))) = space_to_depth(w @ kernel^T)
    grad = jax.grad(lambda x: jnp.sum(w * layers.stage_transition(x, to_jax(t))))(jnp.asarray(x))
    from hitlib.reference.blocking import space_to_depth
    assert_parity(grad, space_to_depth(w @ t["kernel"].T, 2))
    image = r.standard_normal((1, 2, 2, 3)).astype(np.float32)
    grad_image = jax.grad(lambda i: jnp.sum(w * layers.rgb_skip(i, jnp.asarray(w))))(jnp.asarray(image))
    assert_parity(grad_image, w.reshape(1, 2, 2, 2, 2, 3).sum(axis=(2, 4)))  # each pixel feeds its 2x2 square


# ---------------------------------------------------------------- bad input


P_MLP = ref.init_mlp_block(np.random.default_rng(0), 8, "batch")
P_LN = ref.init_norm(None, 4, "layer")
P_BN = ref.init_norm(None, 4, "batch")


@pytest.mark.parametrize("module", [ref, layers], ids=["numpy", "jax"])
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, xp: m.dense(xp.zeros((2, 5)), {"kernel": xp.zeros((4, 3)), "bias": xp.zeros(3)}),
         "x has shape (2, 5) but params['kernel'] (4, 3) needs x [..., 4]"),
        (lambda m, xp: m.dense(xp.zeros((2, 4)), {"kernel": xp.zeros((4, 3)), "bias": xp.zeros(2)}),
         "params['bias'] has shape (2,), expected (3,)"),
        (lambda m, xp: m.dense(xp.zeros((2, 4)), {"kernel": xp.zeros((4, 3))}), "params has no 'bias'"),
        (lambda m, xp: m.normalize(xp.zeros((2, 4)), P_LN, "group"), "kind must be 'batch' or 'layer', got 'group'"),
        (lambda m, xp: m.layer_norm(xp.zeros((2, 4)), ref.init_norm(None, 5, "layer")),
         "params['scale'] has shape (5,), expected (4,)"),
        (lambda m, xp: m.layer_norm(xp.zeros((2, 4)), P_LN, eps=0.0), "eps must be a positive number, got 0.0"),
        (lambda m, xp: m.batch_norm(xp.zeros(4), P_BN), "batch norm needs x of rank >= 2"),
        (lambda m, xp: m.batch_norm(xp.zeros((2, 4)), P_LN), "params has no 'mean'"),
        (lambda m, xp: m.normalize(xp.zeros((2, 4)), P_BN, "layer"), "but layer norm takes exactly ['scale', 'bias']"),
        (lambda m, xp: m.batch_moments(xp.zeros(4)), "x must have rank >= 2 [B, ..., C], got shape (4,)"),
        (lambda m, xp: m.mlp_block(xp.zeros((2, 8)), P_MLP, norm="instance"), "norm must be 'batch' or 'layer'"),
        (lambda m, xp: m.mlp_block(xp.zeros((2, 6)), P_MLP), "params['norm']['scale'] has shape (8,), expected (6,)"),
        (lambda m, xp: m.mlp_block(xp.zeros((2, 8)), {"norm": P_MLP["norm"], "hidden": P_MLP["hidden"],
                                                      "output": ref.init_dense(np.random.default_rng(0), 32, 7)}),
         "params['output'] maps to width 7, but the residual needs the input width 8"),
        (lambda m, xp: m.mlp_block(xp.zeros((2, 8)), {"norm": P_MLP["norm"], "hidden": P_MLP["hidden"]}),
         "params has no 'output'"),
        (lambda m, xp: m.to_rgb(xp.zeros((1, 2, 2, 4)), {"norm": P_BN, "dense": ref.init_dense(np.random.default_rng(0), 4, 4)}),
         "params['dense']['kernel'] must map C -> 3 colours, got shape (4, 4)"),
        (lambda m, xp: m.rgb_skip(xp.zeros((1, 4, 4, 3)), xp.zeros((1, 4, 4, 3))),
         "image has shape (1, 4, 4, 3), but rgb of shape (1, 4, 4, 3) needs the previous image at half its resolution"),
        (lambda m, xp: m.rgb_skip(None, xp.zeros((1, 4, 4, 4))), "rgb must have 3 channels"),
        (lambda m, xp: m.rgb_skip(xp.zeros((1, 1, 2, 3)), xp.zeros((1, 3, 4, 3))), "has an odd height or width"),
        (lambda m, xp: m.rgb_skip(xp.zeros((2, 2, 3)), xp.zeros((1, 4, 4, 3))), "image must have rank 4"),
        (lambda m, xp: m.stage_transition(xp.zeros((1, 4, 4, 6)), None), "channels divisible by 4, got shape (1, 4, 4, 6)"),
        (lambda m, xp: m.stage_transition(xp.zeros((4, 4, 8)), None), "x must have rank 4 [B, H, W, C]"),
        (lambda m, xp: m.stage_transition(xp.zeros((1, 4, 4, 16)), ref.init_dense(np.random.default_rng(0), 16, 8)),
         "params['kernel'] has shape (16, 8), but pixel shuffle leaves C/4 = 4 channels of x (1, 4, 4, 16)"),
        (lambda m, xp: m.batch_norm_running_update(xp.zeros((1, 4)), P_BN),
         "x has shape (1, 4): n = 1 value per channel, but the unbiased variance n/(n-1)·var needs n >= 2"),
        (lambda m, xp: m.batch_norm_running_update(xp.zeros((1, 1, 1, 4)), P_BN), "n = 1 value per channel"),
        (lambda m, xp: m.batch_norm_running_update(xp.zeros(4), P_BN), "x must have rank >= 2 [B, ..., C]"),
        (lambda m, xp: m.batch_norm_running_update(xp.zeros((2, 5)), P_BN),
         "running['mean'] has shape (4,), expected (5,) for x of shape (2, 5)"),
        (lambda m, xp: m.batch_norm_running_update(xp.zeros((2, 4)), P_LN), "running has no 'mean'"),
        (lambda m, xp: m.batch_norm_running_update(xp.zeros((2, 4)), P_BN, 1.5),
         "momentum must be a number in [0, 1], got 1.5"),
    ],
)
def test_bad_input_names_the_argument(module, call, message):
    xp = np if module is ref else jnp
    with pytest.raises(ValueError) as error:
        call(module, xp)
    assert message in str(error.value)


def test_init_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind must be 'batch' or 'layer', got 'group'"):
        ref.init_norm(np.random.default_rng(0), 4, "group")
    with pytest.raises(ValueError, match="width must be divisible by 4"):
        ref.init_stage_transition(np.random.default_rng(0), 6, 4)
