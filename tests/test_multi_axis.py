"""Chapter 3 (section 3.2, Algorithm 2, Table 5): multi-axis attention — loops, chapter-2 cross-checks, JAX vs NumPy,
decomposition, special cases, permutations, the dispatch of every layer kind by name, costs and bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hitlib import multi_axis
from hitlib.reference import attention as attention_ref
from hitlib.reference import multi_axis as ref
from hitlib.reference.blocking import balanced_block_size, block, unblock


# parity needs true float32 products (conftest.py)
pytestmark = pytest.mark.usefixtures("full_float32_precision")


def random_params(seed, width, num_heads, multi_query=True, kernel_scale=20.0, dtype=np.float32):
    "Random parameters with non-zero biases; kernels scaled up so that the scores are far from uniform."
    p = attention_ref.init_attention_params(np.random.default_rng(seed), width, num_heads, multi_query=multi_query,
                                            bias_std=0.5)
    return {name: {"kernel": (leaf["kernel"] * kernel_scale).astype(dtype), "bias": leaf["bias"].astype(dtype)}
            for name, leaf in p.items()}


def to_jax(params):
    return jax.tree.map(jnp.asarray, params)


def as_float64(params):
    return {name: {leaf: np.asarray(value, np.float64) for leaf, value in p.items()} for name, p in params.items()}


@st.composite
def blocked_cases(draw, even_heads=True, dtype=np.float32):
    "(x [B, M, N, C], params) with small random sizes, multi-query or multi-head."
    multi_query = draw(st.booleans())
    num_heads = draw(st.sampled_from([2, 4] if even_heads else [1, 2, 3, 4]))
    head_dim = draw(st.integers(1, 3))
    width = num_heads * head_dim
    batch, num_blocks, block_len = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).standard_normal((batch, num_blocks, block_len, width)).astype(dtype)
    return x, random_params(seed, width, num_heads, multi_query, dtype=dtype)


@st.composite
def map_cases(draw):
    "(x [B, H, W, C], params) with even heads, multi-query or multi-head."
    x, params = draw(blocked_cases())
    return x, params  # the same shapes read as [B, H, W, C]


# --- loops against the vectorised oracle (float64) ------------------------------------------------------------------


@given(blocked_cases(dtype=np.float64))
def test_blocked_variants_match_loops(case):
    x, p = case
    for fast, slow in ((ref.regional_attention, ref.regional_attention_loops),
                       (ref.dilated_attention, ref.dilated_attention_loops),
                       (ref.multi_axis_attention, ref.multi_axis_attention_loops),
                       (ref.multi_axis_attention_matrix, ref.multi_axis_attention_matrix_loops)):
        np.testing.assert_allclose(fast(x, p), slow(x, p), rtol=1e-10, atol=1e-12)


@given(map_cases())
def test_map_variants_match_loops(case):
    x, p = case
    x, p = x.astype(np.float64), as_float64(p)
    np.testing.assert_allclose(ref.axial_attention(x, p), ref.axial_attention_loops(x, p), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.full_attention(x, p), ref.full_attention_loops(x, p), rtol=1e-10, atol=1e-12)


# --- independent formulation through chapter 2 ----------------------------------------------------------------------


def chapter2(params):
    return attention_ref.multi_query_attention if attention_ref.is_multi_query(params) else attention_ref.multi_head_attention


@given(blocked_cases(even_heads=False))
def test_regional_and_dilated_equal_chapter2_per_block_and_per_position(case):
    x, p = case
    attend = chapter2(p)
    np.testing.assert_allclose(ref.regional_attention(x, p), attend(x, x, p), rtol=1e-5, atol=1e-6)
    x_t = x.transpose(0, 2, 1, 3)  # [B, N, M, C]
    np.testing.assert_allclose(ref.dilated_attention(x, p), attend(x_t, x_t, p).transpose(0, 2, 1, 3),
                               rtol=1e-5, atol=1e-6)


@given(map_cases())
def test_full_and_axial_equal_chapter2(case):
    x, p = case
    batch, height, width, channels = x.shape
    attend, half = chapter2(p), p["query"]["kernel"].shape[1] // 2
    num_heads = 2 * half
    tokens = x.reshape(batch, height * width, channels)
    np.testing.assert_allclose(ref.full_attention(x, p), attend(tokens, tokens, p).reshape(x.shape), rtol=1e-5, atol=1e-6)
    rows = attend(x, x, ref.select_heads(p, range(half)))  # each row on its own
    x_t = x.transpose(0, 2, 1, 3)
    columns = attend(x_t, x_t, ref.select_heads(p, range(half, num_heads))).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(ref.axial_attention(x, p), rows + columns - p["out"]["bias"], rtol=1e-5, atol=1e-5)


# --- decomposition, head order, Algorithm 2 -------------------------------------------------------------------------


@given(blocked_cases(dtype=np.float64))
def test_multi_axis_is_regional_first_half_plus_dilated_second_half(case):
    x, p = case
    num_heads = p["query"]["kernel"].shape[1]
    half = num_heads // 2
    parts = (ref.regional_attention(x, ref.select_heads(p, range(half)))
             + ref.dilated_attention(x, ref.select_heads(p, range(half, num_heads))))
    np.testing.assert_allclose(ref.multi_axis_attention(x, p), parts - p["out"]["bias"], rtol=1e-10, atol=1e-12)


@given(blocked_cases(dtype=np.float64), st.randoms(use_true_random=False))
def test_permuting_heads_within_a_half_changes_nothing(case, random):
    x, p = case
    num_heads = p["query"]["kernel"].shape[1]
    half = num_heads // 2
    first, second = list(range(half)), list(range(half, num_heads))
    random.shuffle(first)
    random.shuffle(second)
    np.testing.assert_allclose(ref.multi_axis_attention(x, ref.select_heads(p, first + second)),
                               ref.multi_axis_attention(x, p), rtol=1e-10, atol=1e-12)
    swapped_twice = ref.swap_head_halves(ref.swap_head_halves(p))
    for name in p:
        for leaf in p[name]:
            np.testing.assert_array_equal(swapped_twice[name][leaf], p[name][leaf])


def algorithm2(X, Y, W_q, W_k, W_v, W_o):
    "The paper's Algorithm 2 with np.einsum in place of tf.einsum (no biases, no logit scale, dilated heads first)."
    Q = np.einsum("bmnd,hdk->bhmnk", X, W_q)
    Q1, Q2 = np.split(Q, 2, axis=1)
    K = np.einsum("bmnd,dk->bmnk", Y, W_k)
    V = np.einsum("bmnd,dv->bmnv", Y, W_v)
    O1 = np.einsum("bhyxz,bzyv->bhxyv", attention_ref.softmax(np.einsum("bhxyk,bzyk->bhyxz", Q1, K)), V)
    O2 = np.einsum("bhxyz,bxzv->bhxyv", attention_ref.softmax(np.einsum("bhxyk,bxzk->bhxyz", Q2, K)), V)
    return np.einsum("bhmnv,hdv->bmnd", np.concatenate([O1, O2], axis=1), W_o)


@given(blocked_cases(dtype=np.float64))
def test_algorithm2_is_multi_axis_with_swapped_heads(case):
    x, p = case
    if not attention_ref.is_multi_query(p):
        p = random_params(0, x.shape[-1], p["query"]["kernel"].shape[1], dtype=np.float64)
    unbiased = {name: {"kernel": leaf["kernel"], "bias": np.zeros_like(leaf["bias"])} for name, leaf in p.items()}
    head_dim = p["query"]["kernel"].shape[-1]
    W_q = unbiased["query"]["kernel"].transpose(1, 0, 2) / math.sqrt(head_dim)  # [C, h, d] -> [h, C, d]
    W_o = unbiased["out"]["kernel"].transpose(0, 2, 1)  # [h, d, C] -> [h, C, d]
    expected = algorithm2(x, x, W_q, unbiased["key"]["kernel"], unbiased["value"]["kernel"], W_o)
    np.testing.assert_allclose(ref.multi_axis_attention(x, ref.swap_head_halves(unbiased)), expected,
                               rtol=1e-10, atol=1e-12)


# --- special cases --------------------------------------------------------------------------------------------------


@given(blocked_cases(dtype=np.float64))
def test_one_token_per_block_and_one_block(case):
    x, p = case
    batch, num_blocks, block_len, width = x.shape
    singles = x.reshape(batch, num_blocks * block_len, 1, width)  # [B, M*N, 1, C]: blocks of one token (p = 1)
    if attention_ref.is_multi_query(p):
        values = np.einsum("bmnc,cd->bmnd", singles, p["value"]["kernel"]) + p["value"]["bias"]
        own_value = np.einsum("bmnd,hdc->bmnc", values, p["out"]["kernel"]) + p["out"]["bias"]
    else:
        values = np.einsum("bmnc,chd->bmnhd", singles, p["value"]["kernel"]) + p["value"]["bias"]
        own_value = np.einsum("bmnhd,hdc->bmnc", values, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(ref.regional_attention(singles, p), own_value, rtol=1e-10, atol=1e-12)  # identity on v
    one_block = singles.transpose(0, 2, 1, 3)  # [B, 1, M*N, C]: a single block
    np.testing.assert_allclose(ref.dilated_attention(one_block, p), own_value.transpose(0, 2, 1, 3), rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(ref.dilated_attention(singles, p), ref.full_attention(one_block, p).transpose(0, 2, 1, 3),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.regional_attention(one_block, p), ref.full_attention(one_block, p), rtol=1e-10,
                               atol=1e-12)


# --- permutations ---------------------------------------------------------------------------------------------------


@given(blocked_cases(dtype=np.float64), st.integers(0, 2**16))
def test_permutation_equivariance(case, seed):
    x, p = case
    batch, num_blocks, block_len, _ = x.shape
    rng = np.random.default_rng(seed)
    perm_m, perm_n = rng.permutation(num_blocks), rng.permutation(block_len)
    # Multi-axis: the same permutation of the blocks, and of the in-block positions, commutes with the layer.
    permuted = x[:, perm_m][:, :, perm_n]
    np.testing.assert_allclose(ref.multi_axis_attention(permuted, p), ref.multi_axis_attention(x, p)[:, perm_m][:, :, perm_n],
                               rtol=1e-10, atol=1e-12)
    # Regional: every block may shuffle its tokens its own way; dilated: every position may shuffle the blocks.
    perms_n = np.stack([rng.permutation(block_len) for _ in range(num_blocks)])  # [M, N]
    per_block = np.take_along_axis(x, perms_n[None, :, :, None], axis=2)
    np.testing.assert_allclose(ref.regional_attention(per_block, p),
                               np.take_along_axis(ref.regional_attention(x, p), perms_n[None, :, :, None], axis=2),
                               rtol=1e-10, atol=1e-12)
    perms_m = np.stack([rng.permutation(num_blocks) for _ in range(block_len)], axis=1)  # [M, N]
    per_position = np.take_along_axis(x, perms_m[None, :, :, None], axis=1)
    np.testing.assert_allclose(ref.dilated_attention(per_position, p),
                               np.take_along_axis(ref.dilated_attention(x, p), perms_m[None, :, :, None], axis=1),
                               rtol=1e-10, atol=1e-12)


def test_multi_axis_is_not_equivariant_to_arbitrary_token_permutations():
    # Swapping two tokens that share neither a block nor an in-block position changes the layer (full attention would
    # not care): the layer sees the blocked structure.
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 8))
    p = as_float64(random_params(1, 8, 2))
    swapped = x.copy()
    swapped[0, 0, 0], swapped[0, 1, 1] = x[0, 1, 1], x[0, 0, 0]
    expected = ref.multi_axis_attention(x, p)
    expected[0, 0, 0], expected[0, 1, 1] = expected[0, 1, 1].copy(), expected[0, 0, 0].copy()
    assert not np.allclose(ref.multi_axis_attention(swapped, p), expected, rtol=1e-3)
    full = ref.full_attention(x, p)
    full[0, 0, 0], full[0, 1, 1] = full[0, 1, 1].copy(), full[0, 0, 0].copy()
    np.testing.assert_allclose(ref.full_attention(swapped, p), full, rtol=1e-10, atol=1e-12)


# --- weights --------------------------------------------------------------------------------------------------------


@given(blocked_cases())
def test_weights_shapes_rows_and_matrix(case):
    x, p = case
    batch, num_blocks, block_len, _ = x.shape
    half = p["query"]["kernel"].shape[1] // 2
    regional, dilated = ref.multi_axis_attention_weights(x, p)
    assert regional.shape == (batch, half, num_blocks, block_len, block_len)
    assert dilated.shape == (batch, half, block_len, num_blocks, num_blocks)
    np.testing.assert_allclose(regional.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(dilated.sum(-1), 1.0, rtol=1e-5)
    matrix = ref.multi_axis_attention_matrix(x, p)
    tokens = num_blocks * block_len
    assert matrix.shape == (batch, 2 * half, tokens, tokens)
    np.testing.assert_allclose(matrix.sum(-1), 1.0, rtol=1e-5)
    # The weights are attention_weights of chapter 2 per block (regional) and per in-block position (dilated).
    chapter2_weights = attention_ref.attention_weights(x, x, p)  # [B, M, h, N, N]
    np.testing.assert_allclose(regional, chapter2_weights[:, :, :half].transpose(0, 2, 1, 3, 4), rtol=1e-5, atol=1e-7)
    x_t = x.transpose(0, 2, 1, 3)
    chapter2_weights = attention_ref.attention_weights(x_t, x_t, p)  # [B, N, h, M, M]
    np.testing.assert_allclose(dilated, chapter2_weights[:, :, half:].transpose(0, 2, 1, 3, 4), rtol=1e-5, atol=1e-7)


# --- JAX against NumPy ----------------------------------------------------------------------------------------------


# A few fixed shapes (batch, blocks M, tokens per block N, heads, head width, multi-query?), so that the jitted functions
# compile once per shape and the examples differ in their data and weights.
JAX_SHAPES = [(2, 3, 4, 2, 2, True), (1, 1, 5, 4, 1, False), (2, 5, 1, 2, 3, False), (1, 4, 4, 4, 2, True),
              (2, 2, 3, 4, 1, True), (1, 3, 2, 2, 2, False)]
ODD_HEAD_SHAPES = [(2, 3, 2, 3, 2, True), (1, 2, 4, 1, 3, False), (1, 4, 3, 3, 1, False)]
JITTED = {name: jax.jit(getattr(multi_axis, name)) for name in (
    "regional_attention", "dilated_attention", "multi_axis_attention", "multi_axis_attention_matrix",
    "multi_axis_attention_weights", "axial_attention", "full_attention")}


def jax_case(shape, seed):
    batch, num_blocks, block_len, num_heads, head_dim, multi_query = shape
    x = np.random.default_rng(seed).standard_normal((batch, num_blocks, block_len, num_heads * head_dim))
    return x.astype(np.float32), random_params(seed, num_heads * head_dim, num_heads, multi_query)


@given(st.sampled_from(JAX_SHAPES), st.integers(0, 2**16))
def test_jax_equals_numpy(shape, seed):
    x, p = jax_case(shape, seed)
    for name in ("multi_axis_attention", "multi_axis_attention_matrix", "axial_attention", "full_attention"):
        expected = getattr(ref, name)(x, p)
        got = np.asarray(JITTED[name](jnp.asarray(x), to_jax(p)))
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    for got, expected in zip(JITTED["multi_axis_attention_weights"](jnp.asarray(x), to_jax(p)),
                             ref.multi_axis_attention_weights(x, p)):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)


@given(st.sampled_from(JAX_SHAPES + ODD_HEAD_SHAPES), st.integers(0, 2**16))
def test_jax_single_axis_variants_with_any_heads(shape, seed):
    x, p = jax_case(shape, seed)
    for name in ("regional_attention", "dilated_attention"):
        np.testing.assert_allclose(np.asarray(JITTED[name](jnp.asarray(x), to_jax(p))), getattr(ref, name)(x, p),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_jax_eager_equals_numpy():
    x, p = jax_case(JAX_SHAPES[0], 7)
    for name in JITTED:
        for got, expected in zip(jax.tree.leaves(getattr(multi_axis, name)(jnp.asarray(x), to_jax(p))),
                                 jax.tree.leaves(getattr(ref, name)(x, p))):
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
def test_jit_and_grad_against_finite_differences(multi_query):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    p = random_params(4, 8, 4, multi_query, kernel_scale=10.0)
    jitted = jax.jit(multi_axis.multi_axis_attention)
    np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(x), to_jax(p))), ref.multi_axis_attention(x, p),
                               rtol=1e-5, atol=1e-6)

    def loss_ref64(params, x):
        return float(np.sum(ref.multi_axis_attention(np.asarray(x, np.float64), as_float64(params)) * w))

    grad_p, grad_x = jax.jit(jax.grad(lambda params, x: jnp.sum(multi_axis.multi_axis_attention(x, params) * w),
                                      argnums=(0, 1)))(to_jax(p), jnp.asarray(x))
    eps = 1e-5
    for name in p:
        for leaf in p[name]:
            u = rng.standard_normal(p[name][leaf].shape)
            plus = {n: {l: (v + eps * u if (n, l) == (name, leaf) else v) for l, v in d.items()} for n, d in p.items()}
            minus = {n: {l: (v - eps * u if (n, l) == (name, leaf) else v) for l, v in d.items()} for n, d in p.items()}
            numeric = (loss_ref64(plus, x) - loss_ref64(minus, x)) / (2 * eps)
            analytic = float(np.sum(np.asarray(grad_p[name][leaf], np.float64) * u))
            if (name, leaf) == ("key", "bias"):  # a constant shift of every logit of a row: no effect, no gradient
                assert abs(numeric) < 1e-7 and abs(analytic) < 1e-4
            else:
                np.testing.assert_allclose(analytic, numeric, rtol=1e-4, err_msg=f"{name}.{leaf}")
    u = rng.standard_normal(x.shape)
    numeric = (loss_ref64(p, x + eps * u) - loss_ref64(p, x - eps * u)) / (2 * eps)
    np.testing.assert_allclose(float(np.sum(np.asarray(grad_x, np.float64) * u)), numeric, rtol=1e-4)


# --- the dispatch: one layer of every kind by name ------------------------------------------------------------------

SELF_ATTENTION_JIT = jax.jit(multi_axis.self_attention, static_argnames=("kind", "block_size"))


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
@pytest.mark.parametrize("kind", ref.LAYER_ATTENTION_KINDS)
def test_self_attention_jax_equals_numpy_for_every_kind(kind, multi_query):
    """float32 map [2, 4, 6, 16], blocks of 2x2 (M = 6, N = 4), random non-zero biases (std 0.5), kernels x20:
    rtol 1e-5, and for the outputs near zero atol 1e-6 of the largest output (float32 rounding); jitted and eager."""
    x = np.random.default_rng(11).standard_normal((2, 4, 6, 16)).astype(np.float32)
    p = random_params(12, 16, 4, multi_query)
    assert all(np.any(leaf["bias"] != 0) for leaf in p.values())
    expected = ref.self_attention(x, p, kind, 2)
    assert expected.dtype == np.float32 and expected.shape == x.shape
    for fn in (SELF_ATTENTION_JIT, multi_axis.self_attention):
        got = np.asarray(fn(jnp.asarray(x), to_jax(p), kind, 2))
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(), err_msg=kind)


@pytest.mark.parametrize("kind", ref.LAYER_ATTENTION_KINDS)
def test_self_attention_reads_exactly_the_region_of_its_kind(kind):
    """Perturb one input pixel at a time: the output at a query pixel moves iff the pixel lies in the region of
    one of the heads (`attention_region`, from pixel coordinates alone), on a non-square map."""
    height, width, block_size = 4, 6, 2
    x = np.random.default_rng(0).standard_normal((1, height, width, 8))
    p = as_float64(random_params(3, 8, 4))
    base = ref.self_attention(x, p, kind, block_size)
    for query in ((0, 0), (1, 2), (3, 5)):
        region = (ref.attention_region(kind, height, width, query, 0, block_size)
                  | ref.attention_region(kind, height, width, query, 1, block_size))
        for i, j in np.ndindex(height, width):
            nudged = x.copy()
            nudged[0, i, j] += 1.0
            out = ref.self_attention(nudged, p, kind, block_size)
            moved = not np.allclose(out[0, query[0], query[1]], base[0, query[0], query[1]], rtol=0, atol=1e-12)
            assert moved == region[i, j], (kind, query, (i, j))


def test_self_attention_is_the_named_function():
    "Exactly the kind's function: on the map (full, axial) or on the blocked map, unblocked (data movement)."
    x = np.random.default_rng(5).standard_normal((2, 4, 4, 8)).astype(np.float32)
    p = random_params(6, 8, 4)
    on_blocks = {"blocked_local": ref.regional_attention, "dilated": ref.dilated_attention,
                 "multi_axis": ref.multi_axis_attention}
    for kind, fn in on_blocks.items():
        np.testing.assert_array_equal(ref.self_attention(x, p, kind, 2), unblock(fn(block(x, 2), p), 4, 4))
    np.testing.assert_array_equal(ref.self_attention(x, p, "full"), ref.full_attention(x, p))
    np.testing.assert_array_equal(ref.self_attention(x, p, "axial", 2), ref.axial_attention(x, p))
    outputs = [ref.self_attention(x, p, kind, 2) for kind in ref.LAYER_ATTENTION_KINDS]
    assert all(not np.allclose(a, b) for k, a in enumerate(outputs) for b in outputs[k + 1:])


# --- geometry and costs ---------------------------------------------------------------------------------------------


@st.composite
def map_geometry(draw):
    block_size = draw(st.integers(1, 3))
    height, width = block_size * draw(st.integers(1, 3)), block_size * draw(st.integers(1, 3))
    num_heads = draw(st.sampled_from([2, 4]))
    channels = num_heads * draw(st.integers(1, 3))
    return height, width, channels, num_heads, block_size


@given(map_geometry(), st.sampled_from(ref.LAYER_ATTENTION_KINDS), st.booleans(), st.booleans())
def test_attention_flops_match_loops(geometry, kind, multi_query, projections):
    args = (kind, *geometry, multi_query, projections)
    assert ref.attention_flops(*args) == ref.attention_flops_loops(*args)


@given(map_geometry(), st.integers(0, 2**16))
def test_attention_region_is_the_computed_support(geometry, seed):
    height, width, channels, num_heads, block_size = geometry
    x = np.random.default_rng(seed).standard_normal((1, height, width, channels))
    p = as_float64(random_params(seed, channels, num_heads))
    pixel_of = block(np.arange(height * width).reshape(1, height, width, 1), block_size).reshape(-1)  # token -> pixel
    matrix = ref.multi_axis_attention_matrix(block(x, block_size), p)[0]  # [h, T, T]
    for t, pixel in enumerate(pixel_of):
        for head in range(num_heads):
            attended = np.zeros(height * width, bool)
            attended[pixel_of[matrix[head, t] > 0]] = True
            region = ref.attention_region("multi_axis", height, width, divmod(int(pixel), width),
                                          int(head >= num_heads // 2), block_size)
            np.testing.assert_array_equal(attended.reshape(height, width), region)


def test_output_depends_exactly_on_the_region():
    # Perturb one input pixel at a time: the output at a query pixel moves iff the pixel is in the region of a head.
    height = width = 4
    block_size = 2
    x = np.random.default_rng(0).standard_normal((1, height, width, 4))
    p = as_float64(random_params(2, 4, 2))

    def layer(x):
        return unblock(ref.multi_axis_attention(block(x, block_size), p), height, width)

    base = layer(x)
    for query in ((0, 0), (1, 2), (3, 3)):
        union = (ref.attention_region("multi_axis", height, width, query, 0, block_size)
                 | ref.attention_region("multi_axis", height, width, query, 1, block_size))
        for i in range(height):
            for j in range(width):
                nudged = x.copy()
                nudged[0, i, j] += 1.0
                moved = not np.allclose(layer(nudged)[0, query[0], query[1]], base[0, query[0], query[1]], rtol=0,
                                        atol=1e-12)
                assert moved == union[i, j], (query, (i, j))


def test_cost_slopes_and_balance():
    sides = [8, 16, 32, 64, 128, 256]
    tokens = np.array([s * s for s in sides], float)
    counts = {kind: [ref.attention_flops(kind, s, s, 64, 4, balanced_block_size(s, s)) for s in sides]
              for kind in ("full", "axial", "multi_axis")}
    slope = {kind: np.polyfit(np.log(tokens), np.log(np.array(c, float)), 1)[0] for kind, c in counts.items()}
    assert abs(slope["full"] - 2.0) < 1e-9 and abs(slope["axial"] - 1.5) < 1e-9
    assert abs(slope["multi_axis"] - 1.5) < 0.05
    assert counts["full"][-1] / counts["multi_axis"][-1] == 256  # √N at exact balance
    for height, width in ((8, 8), (16, 16), (32, 32), (64, 64), (16, 64), (24, 40)):
        divisors = [p for p in range(1, min(height, width) + 1) if height % p == 0 and width % p == 0]
        cheapest = min(ref.attention_flops("multi_axis", height, width, 8, 2, p) for p in divisors)
        assert ref.attention_flops("multi_axis", height, width, 8, 2, balanced_block_size(height, width)) == cheapest


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [ref, multi_axis], ids=["numpy", "jax"])
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, xp, p3, p4: m.multi_axis_attention(xp.zeros((2, 4, 4, 12)), p3),
         "multi-axis attention needs an even num_heads, got 3"),
        (lambda m, xp, p3, p4: m.multi_axis_attention_weights(xp.zeros((2, 4, 4, 12)), p3),
         "multi-axis attention needs an even num_heads, got 3"),
        (lambda m, xp, p3, p4: m.axial_attention(xp.zeros((2, 4, 4, 12)), p3),
         "axial attention needs an even num_heads, got 3"),
        (lambda m, xp, p3, p4: m.multi_axis_attention(xp.zeros((2, 16, 8)), p4),
         "x must have rank 4 [B, M, N, C], got shape (2, 16, 8)"),
        (lambda m, xp, p3, p4: m.full_attention(xp.zeros((2, 16, 8)), p4),
         "x must have rank 4 [B, H, W, C], got shape (2, 16, 8)"),
        (lambda m, xp, p3, p4: m.regional_attention(xp.zeros((2, 4, 4, 6)), p4),
         "x has width 6 (shape (2, 4, 4, 6)) but the query kernel's input width C is 8"),
        (lambda m, xp, p3, p4: m.dilated_attention(xp.zeros((2, 0, 4, 8)), p4),
         "x must have at least one token along both attended axes"),
        # the dispatch: layer kinds only (a stage's "interleaved" is chapter 7's to resolve), a block size where needed
        (lambda m, xp, p3, p4: m.self_attention(xp.zeros((2, 4, 4, 8)), p4, "interleaved", 2),
         "kind must be one of ('full', 'axial', 'blocked_local', 'dilated', 'multi_axis'), got kind='interleaved'"),
        (lambda m, xp, p3, p4: m.self_attention(xp.zeros((2, 4, 4, 8)), p4, "sparse"),
         "kind must be one of ('full', 'axial', 'blocked_local', 'dilated', 'multi_axis'), got kind='sparse'"),
        (lambda m, xp, p3, p4: m.self_attention(xp.zeros((2, 4, 4, 8)), p4, "multi_axis"),
         "kind='multi_axis' needs a block_size, got block_size=None"),
        (lambda m, xp, p3, p4: m.self_attention(xp.zeros((2, 4, 4, 8)), p4, "dilated", 3),
         "block_size=3 does not divide the feature map: height=4, width=4"),
        (lambda m, xp, p3, p4: m.self_attention(xp.zeros((2, 4, 4, 12)), p3, "axial"),
         "axial attention needs an even num_heads, got 3"),
    ],
)
def test_bad_input_names_the_argument(module, call, message):
    xp = np if module is ref else jnp
    p3 = attention_ref.init_attention_params(np.random.default_rng(0), 12, 3)
    p4 = attention_ref.init_attention_params(np.random.default_rng(0), 8, 4)
    if module is multi_axis:
        p3, p4 = to_jax(p3), to_jax(p4)
    with pytest.raises(ValueError) as error:
        call(module, xp, p3, p4)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (("multi_axis", 8, 8, 64, 4), "kind='multi_axis' needs a block_size, got block_size=None"),
        (("multi_axis", 8, 8, 64, 4, 3), "block_size=3 does not divide the feature map: height=8, width=8"),
        (("multi_axis", 8, 8, 60, 3, 2), "multi-axis attention needs an even num_heads, got 3"),
        (("axial", 8, 8, 60, 3), "axial attention needs an even num_heads, got 3"),
        (("full", 8, 8, 64, 5), "num_heads=5 must divide channels=64"),
        (("sparse", 8, 8, 64, 4), "kind must be one of"),
        (("full", 0, 8, 64, 4), "height must be a positive integer, got height=0"),
    ],
)
def test_attention_flops_bad_input(args, message):
    with pytest.raises(ValueError) as error:
        ref.attention_flops(*args)
    assert message in str(error.value)
