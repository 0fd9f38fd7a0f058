"""Chapter 2 (Algorithm 2's multi-query attention, Table 8's MHA): loops, JAX vs NumPy, invariances, bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hitlib import attention
from hitlib.reference import attention as ref


# parity needs true float32 products (conftest.py)
pytestmark = pytest.mark.usefixtures("full_float32_precision")


def random_params(seed, width, num_heads, kv_width, multi_query, kernel_scale=20.0, dtype=np.float32):
    "Random parameters with non-zero biases; kernels scaled up so that the scores are far from uniform."
    p = ref.init_attention_params(np.random.default_rng(seed), width, num_heads, kv_width=kv_width,
                                  multi_query=multi_query, bias_std=0.5)
    return {name: {"kernel": (leaf["kernel"] * kernel_scale).astype(dtype), "bias": leaf["bias"].astype(dtype)}
            for name, leaf in p.items()}


def to_jax(params):
    return jax.tree.map(jnp.asarray, params)


@st.composite
def attention_cases(draw, max_lead=2):
    "(x [..., Nq, C], y [..., Nk, C_kv], params) in float32 for a random flavour and small random shapes."
    multi_query = draw(st.booleans())
    num_heads = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 4))
    width = num_heads * head_dim
    kv_width = draw(st.integers(1, 6))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=max_lead)))
    num_queries, num_keys = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    data = np.random.default_rng(seed)
    x = data.standard_normal(lead + (num_queries, width)).astype(np.float32)
    y = data.standard_normal(lead + (num_keys, kv_width)).astype(np.float32)
    return x, y, random_params(seed, width, num_heads, kv_width, multi_query)


def flavour(params):
    "The (NumPy, JAX, loops) functions for the flavour of `params`."
    if ref.is_multi_query(params):
        return ref.multi_query_attention, attention.multi_query_attention, ref.multi_query_attention_loops
    return ref.multi_head_attention, attention.multi_head_attention, ref.multi_head_attention_loops


def as_float64(params):
    return {name: {leaf: value.astype(np.float64) for leaf, value in p.items()} for name, p in params.items()}


# --- softmax -------------------------------------------------------------------------------------------------------


def test_softmax_is_stable_where_the_naive_formula_overflows():
    logits = np.array([[1.0, 2.0, 3.0], [100.0, 101.0, 102.0], [1e4, -1e4, 0.0]], np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        naive = np.exp(logits) / np.sum(np.exp(logits), axis=-1, keepdims=True)
    assert np.all(np.isnan(naive[1]))  # the textbook formula fails on row 2 ...
    for module in (ref, attention):
        stable = np.asarray(module.softmax(jnp.asarray(logits) if module is attention else logits))
        assert np.all(np.isfinite(stable))  # ... the stable one does not
        np.testing.assert_allclose(stable.sum(-1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(stable[1], stable[0], rtol=1e-6)  # shift invariance
        np.testing.assert_allclose(stable[0], naive[0], rtol=1e-6)
        np.testing.assert_allclose(stable[2], [1.0, 0.0, 0.0], atol=1e-30)
        assert stable.dtype == np.float32


@given(st.integers(0, 2**16), st.integers(0, 2))
def test_softmax_matches_loops_on_any_axis(seed, axis):
    logits = np.random.default_rng(seed).standard_normal((3, 4, 5)) * 30
    np.testing.assert_allclose(ref.softmax(logits), ref.softmax_loops(logits), rtol=1e-12)
    moved = np.moveaxis(ref.softmax_loops(np.moveaxis(logits, axis, -1)), -1, axis)
    np.testing.assert_allclose(ref.softmax(logits, axis=axis), moved, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(attention.softmax(jnp.asarray(logits.astype(np.float32)), axis=axis)),
                               moved, rtol=1e-5, atol=1e-7)


# --- dot-product attention -----------------------------------------------------------------------------------------


@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 4))
def test_dot_product_attention_matches_loops_and_broadcasts(seed, heads, d):
    data = np.random.default_rng(seed)
    q = data.standard_normal((2, heads, 3, d))  # [B, h, Nq, d]
    k = data.standard_normal((2, 1, 4, d))  # one key head, broadcast over the query heads
    v = data.standard_normal((1, 1, 4, 5))
    out = ref.dot_product_attention(q, k, v)
    assert out.shape == (2, heads, 3, 5)
    np.testing.assert_allclose(out, ref.dot_product_attention_loops(q, k, v), rtol=1e-10, atol=1e-12)
    got = attention.dot_product_attention(*(jnp.asarray(a.astype(np.float32)) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(got), out, rtol=1e-5, atol=1e-6)


def test_dot_product_attention_is_the_formula():
    data = np.random.default_rng(0)
    q, k, v = data.standard_normal((5, 4)), data.standard_normal((6, 4)), data.standard_normal((6, 3))
    logits = q @ k.T / math.sqrt(4)
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(ref.dot_product_attention(q, k, v), weights @ v, rtol=1e-12)


# --- multi-query and multi-head attention --------------------------------------------------------------------------


@given(attention_cases(max_lead=1))
def test_vectorised_matches_loops(case):
    x, y, params = case
    numpy_fn, _, loops_fn = flavour(params)
    x64, y64, p64 = x.astype(np.float64), y.astype(np.float64), as_float64(params)
    out = numpy_fn(x64, y64, p64)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, loops_fn(x64, y64, p64), rtol=1e-10, atol=1e-10)
    scores = ref.attention_weights(x64, y64, p64)
    num_heads = params["query"]["kernel"].shape[1]
    assert scores.shape == x.shape[:-2] + (num_heads, x.shape[-2], y.shape[-2])
    np.testing.assert_allclose(scores, ref.attention_weights_loops(x64, y64, p64), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-12)


@given(attention_cases())
def test_jax_matches_numpy(case):
    x, y, params = case
    numpy_fn, jax_fn, _ = flavour(params)
    expected = numpy_fn(x, y, params)
    assert expected.dtype == np.float32
    got = jax_fn(jnp.asarray(x), jnp.asarray(y), to_jax(params))
    assert got.dtype == jnp.float32 and got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)  # float32, outputs of order 10
    scores = attention.attention_weights(jnp.asarray(x), jnp.asarray(y), to_jax(params))
    np.testing.assert_allclose(np.asarray(scores), ref.attention_weights(x, y, params), rtol=1e-5, atol=1e-7)


@given(attention_cases())
def test_jit_matches_numpy(case):
    x, y, params = case
    numpy_fn, jax_fn, _ = flavour(params)
    got = jax.jit(jax_fn)(jnp.asarray(x), jnp.asarray(y), to_jax(params))
    np.testing.assert_allclose(np.asarray(got), numpy_fn(x, y, params), rtol=1e-5, atol=1e-5)


@given(attention_cases())
def test_multi_query_equals_multi_head_with_tiled_keys_and_values(case):
    x, y, params = case
    if not ref.is_multi_query(params):
        params = {**params, "key": {"kernel": params["key"]["kernel"][:, 0], "bias": params["key"]["bias"][0]},
                  "value": {"kernel": params["value"]["kernel"][:, 0], "bias": params["value"]["bias"][0]}}
    tiled = ref.multi_query_to_multi_head(params)
    num_heads = params["query"]["kernel"].shape[1]
    assert tiled["key"]["kernel"].shape == params["key"]["kernel"].shape[:1] + (num_heads,) + params["key"]["kernel"].shape[1:]
    expected = ref.multi_query_attention(x, y, params)
    np.testing.assert_allclose(ref.multi_head_attention(x, y, tiled), expected, rtol=1e-5, atol=1e-5)


def test_untied_multi_head_differs_from_multi_query():
    # The equivalence above is not vacuous: perturb one head's keys and the outputs differ.
    data = np.random.default_rng(0)
    x, y = data.standard_normal((2, 5, 8)).astype(np.float32), data.standard_normal((2, 4, 6)).astype(np.float32)
    params = random_params(0, 8, 4, 6, True)
    tiled = ref.multi_query_to_multi_head(params)
    tiled["key"]["kernel"] = tiled["key"]["kernel"].copy()
    tiled["key"]["kernel"][:, 1] += data.standard_normal(tiled["key"]["kernel"][:, 1].shape).astype(np.float32)
    assert np.abs(ref.multi_head_attention(x, y, tiled) - ref.multi_query_attention(x, y, params)).max() > 1e-2


@given(attention_cases(), st.integers(0, 2**16))
def test_permuting_keys_leaves_output_unchanged_and_permuting_queries_permutes_it(case, seed):
    x, y, params = case
    numpy_fn, _, _ = flavour(params)
    perm_rng = np.random.default_rng(seed)
    key_perm, query_perm = perm_rng.permutation(y.shape[-2]), perm_rng.permutation(x.shape[-2])
    out = numpy_fn(x, y, params)
    np.testing.assert_allclose(numpy_fn(x, y[..., key_perm, :], params), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(numpy_fn(x[..., query_perm, :], y, params), out[..., query_perm, :], rtol=1e-5, atol=1e-5)


@given(attention_cases())
def test_key_bias_has_no_effect(case):
    x, y, params = case
    numpy_fn, _, _ = flavour(params)
    shifted = {**params, "key": {"kernel": params["key"]["kernel"], "bias": params["key"]["bias"] + np.float32(2.0)}}
    np.testing.assert_allclose(numpy_fn(x, y, shifted), numpy_fn(x, y, params), rtol=1e-4, atol=1e-4)


def test_every_parameter_but_the_key_bias_matters():
    data = np.random.default_rng(1)
    x, y = data.standard_normal((2, 5, 8)).astype(np.float32), data.standard_normal((2, 4, 6)).astype(np.float32)
    for multi_query in (True, False):
        params = random_params(1, 8, 2, 6, multi_query)
        fn = ref.multi_query_attention if multi_query else ref.multi_head_attention
        out = fn(x, y, params)
        for name in ref._PROJECTIONS:
            for leaf in ("kernel", "bias"):
                changed = {n: dict(p) for n, p in params.items()}
                changed[name][leaf] = params[name][leaf] + np.float32(0.5)
                moved = np.abs(fn(x, y, changed) - out).max()
                assert (moved < 1e-4) if (name, leaf) == ("key", "bias") else (moved > 1e-3), (name, leaf, moved)


def test_grad_matches_finite_differences_of_float64_oracle():
    data = np.random.default_rng(2)
    x, y = data.standard_normal((2, 5, 8)).astype(np.float32), data.standard_normal((2, 4, 6)).astype(np.float32)
    w = data.standard_normal((2, 5, 8))
    for multi_query in (True, False):
        params = random_params(2, 8, 2, 6, multi_query, kernel_scale=10.0)
        numpy_fn, jax_fn, _ = flavour(params)
        grads = jax.grad(lambda p: jnp.sum(jax_fn(jnp.asarray(x), jnp.asarray(y), p) * w))(to_jax(params))
        p64 = as_float64(params)

        def loss(p):
            return float(np.sum(numpy_fn(x.astype(np.float64), y.astype(np.float64), p) * w))

        eps = 1e-5
        for name in ref._PROJECTIONS:
            for leaf in ("kernel", "bias"):
                u = data.standard_normal(params[name][leaf].shape)
                plus = {n: dict(p) for n, p in p64.items()}
                minus = {n: dict(p) for n, p in p64.items()}
                plus[name][leaf] = p64[name][leaf] + eps * u
                minus[name][leaf] = p64[name][leaf] - eps * u
                numeric = (loss(plus) - loss(minus)) / (2 * eps)
                analytic = float(np.sum(np.asarray(grads[name][leaf], np.float64) * u))
                if (name, leaf) == ("key", "bias"):
                    assert abs(numeric) < 1e-7 and np.abs(np.asarray(grads[name][leaf])).max() < 1e-5
                else:
                    np.testing.assert_allclose(analytic, numeric, rtol=1e-4)


# --- initialisation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multi_query", [True, False])
def test_init_layout_dtype_and_statistics(multi_query):
    params = ref.init_attention_params(np.random.default_rng(0), 64, 4, kv_width=24, multi_query=multi_query)
    kv = (16,) if multi_query else (4, 16)
    expected = {"query": ((64, 4, 16), (4, 16)), "key": ((24,) + kv, kv), "value": ((24,) + kv, kv),
                "out": ((4, 16, 64), (64,))}
    for name, (kernel_shape, bias_shape) in expected.items():
        assert params[name]["kernel"].shape == kernel_shape and params[name]["bias"].shape == bias_shape
        assert params[name]["kernel"].dtype == np.float32 and params[name]["bias"].dtype == np.float32
        assert np.all(params[name]["bias"] == 0)
        assert np.abs(params[name]["kernel"]).max() <= 0.04  # truncated at 2 stddev
    ref.check_attention_params((2, 3, 64), (2, 5, 24), params, multi_query=multi_query)
    big = ref.truncated_normal(np.random.default_rng(1), (200_000,), 0.02)
    assert abs(big.std() - 0.02 * 0.87962566) < 1.5e-4 and abs(big.mean()) < 1.5e-4  # ~3 standard errors
    assert np.abs(big).max() <= 0.04


def test_init_is_seeded_and_bias_std_gives_nonzero_biases():
    a = ref.init_attention_params(np.random.default_rng(7), 16, 4, bias_std=0.3)
    b = ref.init_attention_params(np.random.default_rng(7), 16, 4, bias_std=0.3)
    for name in a:
        for leaf in a[name]:
            np.testing.assert_array_equal(a[name][leaf], b[name][leaf])
        assert np.all(a[name]["bias"] != 0)
    assert a["key"]["kernel"].shape == (16, 4)  # kv_width defaults to width


def test_parameter_counts_for_hit_widths():
    def count(p):
        return sum(v.size for d in p.values() for v in d.values())

    assert count(ref.init_attention_params(np.random.default_rng(0), 512, 16)) == 558_144
    assert count(ref.init_attention_params(np.random.default_rng(0), 512, 16, multi_query=False)) == 1_050_624


# --- bad input -----------------------------------------------------------------------------------------------------

_P = ref.init_attention_params(np.random.default_rng(0), 8, 4, kv_width=6)
_P_MHA = ref.init_attention_params(np.random.default_rng(0), 8, 4, kv_width=6, multi_query=False)


def _with(params, name, leaf, value):
    changed = {n: dict(p) for n, p in params.items()}
    changed[name][leaf] = value
    return changed


@pytest.mark.parametrize("module", [ref, attention], ids=["numpy", "jax"])
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, xp: m.multi_query_attention(xp.zeros((2, 5, 7)), xp.zeros((2, 3, 6)), _P),
         "x has width 7 (shape (2, 5, 7)) but the query kernel's input width C is 8"),
        (lambda m, xp: m.multi_query_attention(xp.zeros((2, 5, 8)), xp.zeros((2, 3, 8)), _P),
         "y has width 8 (shape (2, 3, 8)) but the key kernel's input width C_kv is 6"),
        (lambda m, xp: m.multi_query_attention(xp.zeros((2, 5, 8)), xp.zeros((3, 3, 6)), _P),
         "leading dims of x (2,) and y (3,) must match"),
        (lambda m, xp: m.multi_query_attention(xp.zeros((8,)), xp.zeros((3, 6)), _P),
         "x must have rank >= 2 [..., N, C], got shape (8,)"),
        (lambda m, xp: m.multi_query_attention(xp.zeros((5, 8)), xp.zeros((0, 6)), _P),
         "y must have at least one token to attend to, got shape (0, 6)"),
        (lambda m, xp: m.multi_query_attention(xp.zeros((2, 5, 8)), xp.zeros((2, 3, 6)), _P_MHA),
         "these are multi-head parameters, use multi_head_attention"),
        (lambda m, xp: m.multi_head_attention(xp.zeros((2, 5, 8)), xp.zeros((2, 3, 6)), _P),
         "these are multi-query parameters, use multi_query_attention"),
        (lambda m, xp: m.multi_query_attention(xp.zeros((5, 8)), xp.zeros((3, 6)), _with(_P, "out", "bias", np.zeros(7))),
         "params['out']['bias'] has shape (7,), expected (8,)"),
        (lambda m, xp: m.multi_query_attention(xp.zeros((5, 8)), xp.zeros((3, 6)), _with(_P, "value", "kernel", np.zeros((6, 3)))),
         "params['value']['kernel'] has shape (6, 3), expected (6, 2)"),
        (lambda m, xp: m.multi_query_attention(xp.zeros((5, 8)), xp.zeros((3, 6)), _with(_P, "query", "kernel", np.zeros((8, 8)))),
         "params['query']['kernel'] must have shape [C, h, d], got (8, 8)"),
        (lambda m, xp: m.attention_weights(xp.zeros((5, 8)), xp.zeros((3, 6)), _with(_P, "key", "kernel", np.zeros(6))),
         "params['key']['kernel'] must have shape [C_kv, d] (multi-query) or [C_kv, h, d] (multi-head), got (6,)"),
        (lambda m, xp: m.multi_query_attention(xp.zeros((5, 8)), xp.zeros((3, 6)), {"query": _P["query"]}),
         "params must have a dict params['key']"),
        (lambda m, xp: m.multi_query_attention(xp.zeros((5, 8)), xp.zeros((3, 6)), {**_P, "out": {"kernel": _P["out"]["kernel"]}}),
         "params['out'] has no 'bias'"),
        (lambda m, xp: m.dot_product_attention(xp.zeros((5, 4)), xp.zeros((3, 2)), xp.zeros((3, 2))),
         "q and k must have the same width d, got q shape (5, 4) and k shape (3, 2)"),
        (lambda m, xp: m.dot_product_attention(xp.zeros((5, 4)), xp.zeros((3, 4)), xp.zeros((2, 2))),
         "k and v must have the same number of tokens Nk"),
        (lambda m, xp: m.dot_product_attention(xp.zeros((2, 5, 4)), xp.zeros((3, 3, 4)), xp.zeros((3, 3, 2))),
         "leading dims of q (2,) and k (3,) do not broadcast"),
        (lambda m, xp: m.dot_product_attention(xp.zeros((4,)), xp.zeros((3, 4)), xp.zeros((3, 2))),
         "q must have rank >= 2 [..., N, d], got shape (4,)"),
        (lambda m, xp: m.dot_product_attention(xp.zeros((5, 4)), xp.zeros((0, 4)), xp.zeros((0, 2))),
         "k must have at least one token, got k shape (0, 4)"),
        (lambda m, xp: m.dot_product_attention(xp.zeros((5, 4)), xp.zeros((2, 3, 4)), xp.zeros((3, 3, 2))),
         "leading dims of k (2,) and v (3,) do not broadcast"),
    ],
)
def test_bad_input_names_the_argument(module, call, message):
    xp = np if module is ref else jnp
    with pytest.raises(ValueError) as error:
        call(module, xp)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 10, "num_heads": 4}, "num_heads=4 must divide width=10"),
        ({"width": 8, "num_heads": 0}, "num_heads must be a positive integer, got num_heads=0"),
        ({"width": 8, "num_heads": -2}, "num_heads must be a positive integer, got num_heads=-2"),
        ({"width": 8, "num_heads": 2, "kv_width": 0}, "kv_width must be a positive integer, got kv_width=0"),
        ({"width": 0, "num_heads": 2}, "width must be a positive integer, got width=0"),
    ],
)
def test_init_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError) as error:
        ref.init_attention_params(np.random.default_rng(0), **kwargs)
    assert message in str(error.value)


def test_bad_input_fails_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="use multi_head_attention"):
        jax.jit(attention.multi_query_attention)(jnp.zeros((2, 5, 8)), jnp.zeros((2, 3, 6)), to_jax(_P_MHA))
