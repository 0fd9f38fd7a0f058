"""Chapter 4 (section 3.3, Algorithm 1's MultiQueryAttention(X_l, Z, Z)): latent embedding and cross-attention.

NumPy vs naive loops, JAX vs NumPy, equivalence with chapter 2's attention, invariances, cost count, bad input.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hitlib import attention, cross_attention
from hitlib.reference import attention as ref_attention
from hitlib.reference import cross_attention as ref


# parity needs true float32 products (conftest.py)
pytestmark = pytest.mark.usefixtures("full_float32_precision")


def random_params(seed, width, num_heads, kv_width, multi_query=True, kernel_scale=20.0):
    "Attention parameters with random biases; kernels scaled up so that the scores are far from uniform."
    p = ref_attention.init_attention_params(np.random.default_rng(seed), width, num_heads, kv_width=kv_width,
                                            multi_query=multi_query, bias_std=0.5)
    return {name: {"kernel": leaf["kernel"] * np.float32(kernel_scale), "bias": leaf["bias"]} for name, leaf in p.items()}


def random_latent_params(seed, latent_dim, width, grid_size=4):
    "Latent-embedding parameters with a random bias and a kernel scaled to give tokens of order 1."
    p = ref.init_latent_params(np.random.default_rng(seed), latent_dim, width, grid_size=grid_size, bias_std=0.5)
    p["dense"]["kernel"] *= np.float32(10)
    return p


def to_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


def as_float64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def assert_close(got, expected, rtol=1e-5, atol_fraction=1e-6):
    "float32 parity: rtol, plus an absolute `atol_fraction` of the largest |expected| for entries near zero."
    expected = np.asarray(expected)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(np.asarray(got), expected, rtol=rtol, atol=atol_fraction * scale)


@st.composite
def cross_cases(draw):
    "(x [B, H, W, C] or [B, N, C], latent [B, L, C_kv], params), float32, random flavour and small random shapes."
    multi_query = draw(st.booleans())
    num_heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    width = num_heads * head_dim
    kv_width = draw(st.integers(1, 5))
    batch = draw(st.integers(1, 2))
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))  # (N,) or (H, W)
    num_latents = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    data = np.random.default_rng(seed)
    x = data.standard_normal((batch,) + spatial + (width,)).astype(np.float32)
    latent = data.standard_normal((batch, num_latents, kv_width)).astype(np.float32)
    return x, latent, random_params(seed, width, num_heads, kv_width, multi_query)


@st.composite
def latent_cases(draw):
    "(z [B, D], params, grid_size), float32."
    grid_size = draw(st.integers(1, 3))
    latent_dim, width, batch = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    z = np.random.default_rng(seed).standard_normal((batch, latent_dim)).astype(np.float32)
    return z, random_latent_params(seed, latent_dim, width, grid_size), grid_size


# --- NumPy against the naive loops ------------------------------------------------------------------------------------


@given(cross_cases())
def test_cross_attention_matches_loops(case):
    x, latent, params = (as_float64(a) for a in case)
    out = ref.cross_attention(x, latent, params)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, ref.cross_attention_loops(x, latent, params), rtol=1e-10, atol=1e-12)
    weights = ref.cross_attention_weights(x, latent, params)
    num_heads = params["query"]["kernel"].shape[1]
    assert weights.shape == (x.shape[0], num_heads, int(np.prod(x.shape[1:-1])), latent.shape[1])
    np.testing.assert_allclose(weights, ref.cross_attention_weights_loops(x, latent, params), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-12)


@given(latent_cases())
def test_latent_tokens_matches_loops(case):
    z, params, grid_size = as_float64(case[:2]) + (case[2],)
    latent = ref.latent_tokens(z, params, grid_size=grid_size)
    assert latent.shape == (z.shape[0], grid_size**2, params["pos"].shape[1])
    np.testing.assert_allclose(latent, ref.latent_tokens_loops(z, params, grid_size=grid_size), rtol=1e-12, atol=1e-12)


def test_latent_tokens_reads_the_kernel_token_by_token():
    # Token l of Z is columns l*C0 ... l*C0 + C0 - 1 of the dense layer, plus row l of P_Z.
    z = np.eye(3)  # z = e_i picks row i of the kernel
    params = {"dense": {"kernel": np.arange(3 * 4 * 2, dtype=np.float64).reshape(3, 8), "bias": np.zeros(8)},
              "pos": np.full((4, 2), 100.0)}
    latent = ref.latent_tokens(z, params, grid_size=2)
    np.testing.assert_array_equal(latent[1, 2], [8 + 4 + 100, 8 + 5 + 100])  # row 1 = 8..15, token 2 = columns 4, 5
    np.testing.assert_array_equal(latent, ref.latent_tokens_loops(z, params, grid_size=2))


def test_latent_tokens_ignores_extra_entries():
    # The generator keeps the norm of Z next to its dense layer and position embedding.
    z = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    params = random_latent_params(1, 5, 3)
    with_norm = {**params, "norm": {"scale": np.ones(3), "bias": np.zeros(3)}}
    np.testing.assert_array_equal(ref.latent_tokens(z, with_norm), ref.latent_tokens(z, params))


# --- JAX against NumPy ------------------------------------------------------------------------------------------------


@jax.jit
def jax_output_and_weights(x, latent, params):
    "Both JAX functions in one compiled program (one compilation per hypothesis example instead of one per op)."
    return (cross_attention.cross_attention(x, latent, params),
            cross_attention.cross_attention_weights(x, latent, params))


@given(cross_cases())
def test_jax_cross_attention_equals_numpy(case):
    x, latent, params = case
    got, weights = jax_output_and_weights(jnp.asarray(x), jnp.asarray(latent), to_jax(params))
    assert got.shape == x.shape and got.dtype == jnp.float32
    assert_close(got, ref.cross_attention(x, latent, params))
    assert_close(weights, ref.cross_attention_weights(x, latent, params))


@given(latent_cases())
def test_jax_latent_tokens_equals_numpy(case):
    z, params, grid_size = case
    got = jax.jit(cross_attention.latent_tokens, static_argnums=2)(jnp.asarray(z), to_jax(params), grid_size)
    assert_close(got, ref.latent_tokens(z, params, grid_size=grid_size))


def test_jit_grad_and_bfloat16():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
    z = rng.standard_normal((2, 6)).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    p_lat, p_att = random_latent_params(4, 6, 10), random_params(5, 8, 2, 10)

    def forward(module, x, z, p_lat, p_att):
        return module.cross_attention(x, module.latent_tokens(z, p_lat), p_att)

    expected = forward(ref, x, z, p_lat, p_att)
    jitted = jax.jit(lambda *args: forward(cross_attention, *args))
    assert_close(jitted(jnp.asarray(x), jnp.asarray(z), to_jax(p_lat), to_jax(p_att)), expected)

    out16 = jitted(*jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), (x, z, p_lat, p_att)))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), expected, atol=0.1)  # bfloat16: 8-bit mantissa

    def loss_jax(x, z, p_lat, p_att):
        return jnp.sum(forward(cross_attention, x, z, p_lat, p_att) * w)

    def loss_ref64(x, z, p_lat, p_att):
        return float(np.sum(forward(ref, *as_float64((x, z, p_lat, p_att))) * w))

    grads = jax.grad(loss_jax, argnums=(0, 1, 2, 3))(jnp.asarray(x), jnp.asarray(z), to_jax(p_lat), to_jax(p_att))
    grad_x, grad_z, grad_lat, grad_att = jax.tree.map(np.asarray, grads)
    assert np.abs(grad_att["key"]["bias"]).max() < 1e-5  # softmax ignores a shift shared by all logits
    eps = 1e-5
    for index, (grad, args_of) in enumerate((
        (grad_x, lambda d: (x + d, z, p_lat, p_att)),
        (grad_z, lambda d: (x, z + d, p_lat, p_att)),
        (grad_lat["pos"], lambda d: (x, z, {**p_lat, "pos": p_lat["pos"] + d}, p_att)),
        (grad_att["query"]["kernel"], lambda d: (x, z, p_lat, {**p_att, "query": {**p_att["query"],
                                                                                  "kernel": p_att["query"]["kernel"] + d}})),
    )):
        u = np.random.default_rng(10 + index).standard_normal(grad.shape)
        numeric = (loss_ref64(*args_of(eps * u)) - loss_ref64(*args_of(-eps * u))) / (2 * eps)
        np.testing.assert_allclose(float(np.sum(grad.astype(np.float64) * u)), numeric, rtol=1e-4)


# --- what cross-attention is ------------------------------------------------------------------------------------------


@given(cross_cases())
def test_is_chapter_2_attention_on_flattened_tokens(case):
    x, latent, params = case
    batch, width = x.shape[0], x.shape[-1]
    tokens = x.reshape(batch, -1, width)  # [B, N, C]
    ref_fn = ref_attention.multi_query_attention if ref_attention.is_multi_query(params) else ref_attention.multi_head_attention
    np.testing.assert_array_equal(ref.cross_attention(x, latent, params).reshape(tokens.shape),
                                  ref_fn(tokens, latent, params))


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
def test_jax_is_chapter_2_attention_on_flattened_tokens(multi_query):
    rng = np.random.default_rng(14)
    x, latent = rng.standard_normal((2, 4, 5, 8)).astype(np.float32), rng.standard_normal((2, 16, 6)).astype(np.float32)
    params = to_jax(random_params(15, 8, 2, 6, multi_query))
    jax_fn = attention.multi_query_attention if multi_query else attention.multi_head_attention
    got = cross_attention.cross_attention(jnp.asarray(x), jnp.asarray(latent), params)
    expected = jax_fn(jnp.asarray(x.reshape(2, 20, 8)), jnp.asarray(latent), params)
    np.testing.assert_array_equal(np.asarray(got).reshape(2, 20, 8), np.asarray(expected))


@given(cross_cases(), st.integers(0, 2**16))
def test_latent_order_does_not_matter(case, seed):
    x, latent, params = case
    perm = np.random.default_rng(seed).permutation(latent.shape[1])
    out = ref.cross_attention(x, latent, params)
    assert_close(ref.cross_attention(x, latent[:, perm], params), out)
    assert_close(ref.cross_attention_weights(x, latent[:, perm], params),
                 ref.cross_attention_weights(x, latent, params)[..., perm])


def test_permuting_the_latent_projection_permutes_the_tokens_and_changes_nothing():
    # Permute the tokens' column blocks of the dense kernel and bias together with the rows of P_Z.
    rng = np.random.default_rng(6)
    z, x = rng.standard_normal((2, 7)).astype(np.float32), rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    p_lat, p_att = random_latent_params(7, 7, 6), random_params(8, 8, 2, 6)
    perm = rng.permutation(16)
    permuted = {"dense": {"kernel": p_lat["dense"]["kernel"].reshape(7, 16, 6)[:, perm].reshape(7, 96),
                          "bias": p_lat["dense"]["bias"].reshape(16, 6)[perm].reshape(96)},
                "pos": p_lat["pos"][perm]}
    latent = ref.latent_tokens(z, p_lat)
    np.testing.assert_array_equal(ref.latent_tokens(z, permuted), latent[:, perm])
    assert_close(ref.cross_attention(x, ref.latent_tokens(z, permuted), p_att), ref.cross_attention(x, latent, p_att))


@given(cross_cases(), st.integers(0, 2**16))
def test_pixels_are_equivariant_and_independent(case, seed):
    x, latent, params = case
    batch, width = x.shape[0], x.shape[-1]
    tokens = x.reshape(batch, -1, width)
    n = tokens.shape[1]
    data = np.random.default_rng(seed)
    perm = data.permutation(n)
    out = ref.cross_attention(x, latent, params).reshape(batch, n, width)
    shuffled = tokens[:, perm].reshape(x.shape)
    assert_close(ref.cross_attention(shuffled, latent, params).reshape(batch, n, width), out[:, perm])
    # Changing one token changes that token's output only.
    poked = tokens.copy()
    b, i = data.integers(batch), data.integers(n)
    poked[b, i] += 1.0
    out_poked = ref.cross_attention(poked.reshape(x.shape), latent, params).reshape(batch, n, width)
    untouched = np.ones((batch, n), bool)
    untouched[b, i] = False
    np.testing.assert_array_equal(out_poked[untouched], out[untouched])


def test_multi_query_is_multi_head_with_tied_keys_and_values():
    rng = np.random.default_rng(9)
    x, latent = rng.standard_normal((2, 3, 3, 12)).astype(np.float32), rng.standard_normal((2, 16, 7)).astype(np.float32)
    p = random_params(10, 12, 3, 7)
    tied = ref_attention.multi_query_to_multi_head(p)
    assert_close(ref.cross_attention(x, latent, tied), ref.cross_attention(x, latent, p))
    assert_close(jax.jit(cross_attention.cross_attention)(jnp.asarray(x), jnp.asarray(latent), to_jax(tied)),
                 ref.cross_attention(x, latent, p))


def test_release_initialisation_gives_nearly_uniform_scores():
    # Kernels of stddev 0.02: every pixel reads the 16 latent tokens almost equally (a z-dependent bias).
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 8, 8, 64)).astype(np.float32)
    latent = rng.standard_normal((2, 16, 128)).astype(np.float32)
    p = ref_attention.init_attention_params(np.random.default_rng(12), 64, 4, kv_width=128)
    scores = ref.cross_attention_weights(x, latent, p)
    assert np.abs(scores - 1 / 16).max() < 0.01


# --- cost and parameter counts ----------------------------------------------------------------------------------------


@given(st.integers(1, 10**6), st.sampled_from([(32, 4), (64, 4), (128, 4), (256, 8), (512, 16)]), st.integers(1, 1024),
       st.integers(1, 64))
def test_flops_formula_is_affine_in_tokens(n, width_heads, kv_width, num_latents):
    width, heads = width_heads
    d = width // heads
    flops = ref.cross_attention_flops(n, width, kv_width, heads, num_latents)
    assert flops == 2 * n * (width**2 + num_latents * width) + 2 * num_latents * kv_width * d
    assert ref.cross_attention_flops(n, width, kv_width, heads, num_latents, multi_query=False) == \
        2 * n * (width**2 + num_latents * width) + 2 * num_latents * kv_width * width
    assert ref.cross_attention_flops(n + 1, width, kv_width, heads, num_latents) - flops == \
        2 * (width**2 + num_latents * width)  # every extra token costs the same: O(N)


def test_flops_agree_with_xla_cost_analysis():
    params = to_jax(ref_attention.init_attention_params(np.random.default_rng(13), 64, 4, kv_width=96))
    x = jax.ShapeDtypeStruct((1, 16, 16, 64), jnp.float32)
    latent = jax.ShapeDtypeStruct((1, 16, 96), jnp.float32)
    cost = jax.jit(cross_attention.cross_attention).lower(x, latent, params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ours = 2 * ref.cross_attention_flops(256, 64, 96, 4, 16)  # two flops per multiply-add
    assert 1.0 <= cost["flops"] / ours < 1.03  # XLA adds the element-wise work (biases, scale, softmax)


def test_latent_grid_parameter_counts():
    # z 512-d, C0 = 512: the 4x4 grid of the release against Algorithm 1's 8x8 (section "Why 16 tokens").
    for grid, expected in ((4, 4_210_688), (8, 16_842_752)):
        tokens = grid * grid
        shapes = {"dense": {"kernel": (512, tokens * 512), "bias": (tokens * 512,)}, "pos": (tokens, 512)}
        assert ref.check_latent_params((1, 512), shapes, grid) == (tokens, 512)
        assert 512 * tokens * 512 + tokens * 512 + tokens * 512 == expected


# --- bad input --------------------------------------------------------------------------------------------------------

P_ATT = random_params(20, 16, 4, 24)
P_LAT = random_latent_params(21, 32, 24)


@pytest.mark.parametrize("module", [ref, cross_attention], ids=["numpy", "jax"])
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, xp: m.cross_attention(xp.zeros((2, 6, 6, 16)), xp.zeros((2, 16, 32)), P_ATT),
         "latent has width C_kv=32 (shape (2, 16, 32)) but params['key']['kernel'] has shape (24, 4), which expects C_kv=24"),
        (lambda m, xp: m.cross_attention(xp.zeros((2, 6, 6, 16)), xp.zeros((3, 16, 24)), P_ATT),
         "x and latent must have the same batch size B, got x shape (2, 6, 6, 16) and latent shape (3, 16, 24)"),
        (lambda m, xp: m.cross_attention(xp.zeros((2, 1, 6, 6, 16)), xp.zeros((2, 16, 24)), P_ATT),
         "x must have rank 3 [B, N, C] or 4 [B, H, W, C], got shape (2, 1, 6, 6, 16)"),
        (lambda m, xp: m.cross_attention(xp.zeros((36, 16)), xp.zeros((2, 16, 24)), P_ATT),
         "x must have rank 3 [B, N, C] or 4 [B, H, W, C], got shape (36, 16)"),
        (lambda m, xp: m.cross_attention(xp.zeros((2, 6, 6, 16)), xp.zeros((16, 24)), P_ATT),
         "latent must have rank 3 [B, L, C_kv], got shape (16, 24)"),
        (lambda m, xp: m.cross_attention(xp.zeros((2, 6, 6, 12)), xp.zeros((2, 16, 24)), P_ATT),
         "x has width C=12 (shape (2, 6, 6, 12)) but params['query']['kernel'] has shape (16, 4, 4), which expects C=16"),
        (lambda m, xp: m.cross_attention(xp.zeros((2, 6, 6, 16)), xp.zeros((2, 0, 24)), P_ATT),
         "latent must have at least one token"),
        (lambda m, xp: m.cross_attention_weights(xp.zeros((2, 6, 6, 16)), xp.zeros((2, 16, 20)), P_ATT),
         "latent has width C_kv=20"),
        (lambda m, xp: m.cross_attention(xp.zeros((2, 6, 6, 16)), xp.zeros((2, 16, 24)), {"query": P_ATT["query"]}),
         "params must have a dict params['key']"),
        (lambda m, xp: m.latent_tokens(xp.zeros((2, 32)), P_LAT, grid_size=8),
         "params['pos'] must have shape [L, C0] with L = grid_size**2 = 64 (grid_size=8), got (16, 24)"),
        (lambda m, xp: m.latent_tokens(xp.zeros((2, 31)), P_LAT),
         "params['dense']['kernel'] has shape (32, 384), expected [D, L*C0] = (31, 384)"),
        (lambda m, xp: m.latent_tokens(xp.zeros((2, 4, 32)), P_LAT), "z must have rank 2 [B, D], got shape (2, 4, 32)"),
        (lambda m, xp: m.latent_tokens(xp.zeros((2, 32)), P_LAT, grid_size=0),
         "grid_size must be a positive integer, got grid_size=0"),
        (lambda m, xp: m.latent_tokens(xp.zeros((2, 32)), {**P_LAT, "dense": {**P_LAT["dense"], "bias": np.zeros(5)}}),
         "params['dense']['bias'] has shape (5,), expected [L*C0] = (384,)"),
        (lambda m, xp: m.latent_tokens(xp.zeros((2, 32)), {"pos": P_LAT["pos"]}),
         "params must be a dict with 'dense'"),
    ],
)
def test_bad_input_names_the_argument(module, call, message):
    xp = np if module is ref else jnp
    with pytest.raises(ValueError) as error:
        call(module, xp)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 128, 512, 4, 16), "num_tokens must be a positive integer, got num_tokens=0"),
        ((256, 128, 512, 3, 16), "num_heads=3 must divide width=128"),
        ((256, 128, 512, 4, 2.0), "num_latents must be a positive integer, got num_latents=2.0"),
        ((256, 128, -1, 4, 16), "kv_width must be a positive integer, got kv_width=-1"),
    ],
)
def test_flops_bad_input(args, message):
    with pytest.raises(ValueError) as error:
        ref.cross_attention_flops(*args)
    assert message in str(error.value)


# --- duplex attention (GANsformer, section 3.1.2; chapter 4a's option) ------------------------------------------------


def random_update_params(seed, width, latent_width, num_heads, multi_query=True, kernel_scale=20.0):
    "`latent_update` parameters with random biases and layer norms; attention kernels scaled up (scores far from uniform)."
    p = ref.init_latent_update_params(np.random.default_rng(seed), width, latent_width, num_heads,
                                      multi_query=multi_query, bias_std=0.5, random_norm=True)
    for leaf in p["attention"].values():
        leaf["kernel"] = leaf["kernel"] * np.float32(kernel_scale)
    return p


@st.composite
def duplex_cases(draw):
    """(x [B, H, W, C] or [B, N, C], latent Z [B, L, C0], keys K [B, L, C0], cross params, update params), float32,
    random flavour and small random shapes."""
    multi_query = draw(st.booleans())
    num_heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    width = num_heads * head_dim
    latent_width = draw(st.integers(1, 5))
    batch = draw(st.integers(1, 2))
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    num_latents = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    data = np.random.default_rng(seed)
    x = data.standard_normal((batch,) + spatial + (width,)).astype(np.float32)
    latent, keys = (data.standard_normal((batch, num_latents, latent_width)).astype(np.float32) for _ in range(2))
    return (x, latent, keys, random_params(seed, width, num_heads, latent_width, multi_query),
            random_update_params(seed + 1, width, latent_width, num_heads, multi_query))


@given(duplex_cases())
def test_duplex_matches_loops(case):
    x, latent, keys, p_cross, p_update = (as_float64(a) for a in case)
    updated = ref.latent_update(keys, x, p_update)
    assert updated.shape == keys.shape
    np.testing.assert_allclose(updated, ref.latent_update_loops(keys, x, p_update), rtol=1e-10, atol=1e-12)
    out = ref.duplex_cross_attention(x, latent, updated, p_cross)
    assert out.shape == x.shape
    np.testing.assert_allclose(out, ref.duplex_cross_attention_loops(x, latent, updated, p_cross),
                               rtol=1e-10, atol=1e-12)


@given(duplex_cases())
def test_duplex_with_keys_from_z_is_cross_attention(case):
    x, latent, _, p_cross, _ = as_float64(case)
    np.testing.assert_allclose(ref.duplex_cross_attention(x, latent, latent, p_cross),
                               ref.cross_attention(x, latent, p_cross), rtol=1e-12, atol=1e-12)


def test_latent_update_is_u_a_written_out():
    # K' = LN(K + MQA(K, LN(X))) with chapter 5's layer norm and chapter 2's attention (GANsformer's u^a(Y, X)).
    from hitlib.reference import layers as ref_layers
    rng = np.random.default_rng(30)
    x, keys = rng.standard_normal((2, 3, 4, 8)), rng.standard_normal((2, 16, 6))
    p = as_float64(random_update_params(31, 8, 6, 2))
    context = ref_layers.layer_norm(x.reshape(2, 12, 8), p["image_norm"])
    attended = ref_attention.multi_query_attention(keys, context, p["attention"])
    np.testing.assert_allclose(ref.latent_update(keys, x, p),
                               ref_layers.layer_norm(keys + attended, p["latent_norm"]), rtol=1e-12, atol=1e-12)


@given(duplex_cases(), st.integers(0, 2**16))
def test_latent_update_ignores_the_order_of_the_pixels(case, seed):
    x, _, keys, _, p_update = case
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, N, C]
    perm = np.random.default_rng(seed).permutation(tokens.shape[1])
    assert_close(ref.latent_update(keys, tokens[:, perm], p_update), ref.latent_update(keys, x, p_update))


@jax.jit
def jax_duplex(x, latent, keys, p_cross, p_update):
    "The JAX update and top-down step in one compiled program."
    updated = cross_attention.latent_update(keys, x, p_update)
    return updated, cross_attention.duplex_cross_attention(x, latent, updated, p_cross)


@given(duplex_cases())
def test_jax_duplex_equals_numpy(case):
    # float32 parity: rtol 1e-5, atol a millionth of the largest output (assert_close).
    x, latent, keys, p_cross, p_update = case
    updated, out = jax_duplex(*(jnp.asarray(a) for a in (x, latent, keys)), to_jax(p_cross), to_jax(p_update))
    expected_keys = ref.latent_update(keys, x, p_update)
    assert updated.dtype == out.dtype == jnp.float32 and out.shape == x.shape
    assert_close(updated, expected_keys)
    assert_close(out, ref.duplex_cross_attention(x, latent, expected_keys, p_cross))


def test_jax_duplex_grad_and_bfloat16():
    rng = np.random.default_rng(32)
    x, latent = rng.standard_normal((2, 3, 4, 8)).astype(np.float32), rng.standard_normal((2, 16, 6)).astype(np.float32)
    p_cross, p_update = random_params(33, 8, 2, 6, kernel_scale=1.0), random_update_params(34, 8, 6, 2, kernel_scale=1.0)
    w = rng.standard_normal(x.shape).astype(np.float32)

    def loss(module, x, p_update):
        return (module.duplex_cross_attention(x, latent, module.latent_update(latent, x, p_update), p_cross) * w).sum()

    grad_x = np.asarray(jax.grad(lambda x: loss(cross_attention, x, to_jax(p_update)))(jnp.asarray(x)))
    u, eps = rng.standard_normal(x.shape), 1e-5
    x64, p64 = x.astype(np.float64), as_float64(p_update)
    numeric = (float(loss(ref, x64 + eps * u, p64)) - float(loss(ref, x64 - eps * u, p64))) / (2 * eps)
    np.testing.assert_allclose(float(np.sum(grad_x.astype(np.float64) * u)), numeric, rtol=1e-4)
    out16 = jax.jit(cross_attention.latent_update)(*jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16),
                                                                 (latent, x, p_update)))
    assert out16.dtype == jnp.bfloat16


def test_latent_update_flops_formula_and_xla():
    n, c, c0, h, l = 64 * 64, 128, 512, 4, 16
    assert ref.latent_update_flops(n, c, c0, h, l) == 2 * l * c0 * c + 2 * n * c * (c // h) + 2 * l * n * c
    assert ref.latent_update_flops(n, c, c0, h, l, multi_query=False) == 2 * l * c0 * c + 2 * n * c * c + 2 * l * n * c
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                          ref.init_latent_update_params(np.random.default_rng(0), 64, 96, 4))
    x = jax.ShapeDtypeStruct((1, 16, 16, 64), jnp.float32)
    keys = jax.ShapeDtypeStruct((1, 16, 96), jnp.float32)
    cost = jax.jit(cross_attention.latent_update).lower(keys, x, params).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ours = 2 * ref.latent_update_flops(256, 64, 96, 4, 16)
    assert 1.0 <= cost["flops"] / ours < 1.15  # XLA adds the layer norms, biases, the scale and the softmax


def test_latent_update_parameter_shapes():
    p = ref.init_latent_update_params(np.random.default_rng(0), 128, 512, 4)
    shapes = jax.tree.map(np.shape, p)
    assert shapes == {"image_norm": {"scale": (128,), "bias": (128,)},
                      "attention": {"query": {"kernel": (512, 4, 32), "bias": (4, 32)},
                                    "key": {"kernel": (128, 32), "bias": (32,)},
                                    "value": {"kernel": (128, 32), "bias": (32,)},
                                    "out": {"kernel": (4, 32, 512), "bias": (512,)}},
                      "latent_norm": {"scale": (512,), "bias": (512,)}}
    mha = ref.init_latent_update_params(np.random.default_rng(0), 128, 512, 4, multi_query=False)
    assert mha["attention"]["key"]["kernel"].shape == (128, 4, 32)


P_UPDATE = random_update_params(22, 16, 24, 4)


@pytest.mark.parametrize("module", [ref, cross_attention], ids=["numpy", "jax"])
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, xp: m.latent_update(xp.zeros((2, 16, 32)), xp.zeros((2, 6, 6, 16)), P_UPDATE),
         "params['latent_norm']['scale'] has shape (24,), expected (32,): the width of keys"),
        (lambda m, xp: m.latent_update(xp.zeros((2, 16, 24)), xp.zeros((2, 6, 6, 8)), P_UPDATE),
         "params['image_norm']['scale'] has shape (16,), expected (8,): the width of x"),
        (lambda m, xp: m.latent_update(xp.zeros((3, 16, 24)), xp.zeros((2, 6, 6, 16)), P_UPDATE),
         "keys and x must have the same batch size B"),
        (lambda m, xp: m.latent_update(xp.zeros((16, 24)), xp.zeros((2, 6, 6, 16)), P_UPDATE),
         "keys must have rank 3 [B, L, C0], got shape (16, 24)"),
        (lambda m, xp: m.latent_update(xp.zeros((2, 16, 24)), xp.zeros((2, 6, 6, 16)), {"attention": {}}),
         "params must be a dict with dicts ('image_norm', 'attention', 'latent_norm')"),
        (lambda m, xp: m.duplex_cross_attention(xp.zeros((2, 6, 6, 16)), xp.zeros((2, 16, 24)),
                                                xp.zeros((2, 8, 24)), P_ATT),
         "keys must have the shape of latent (2, 16, 24) [B, L, C0], got (2, 8, 24)"),
        (lambda m, xp: m.duplex_cross_attention(xp.zeros((2, 6, 6, 16)), xp.zeros((2, 16, 32)),
                                                xp.zeros((2, 16, 32)), P_ATT),
         "latent has width C_kv=32"),
    ],
)
def test_duplex_bad_input_names_the_argument(module, call, message):
    xp = np if module is ref else jnp
    with pytest.raises(ValueError) as error:
        call(module, xp)
    assert message in str(error.value)
