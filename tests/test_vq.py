"""Chapter 16 (VQ-VAE's quantiser for VQ-HiT, appendix A.5, equation 5): nearest codes,
the codebook and commitment losses, codebook usage, the reconstruction and perceptual
terms.

NumPy vs naive loops, JAX vs NumPy, the straight-through estimator and where the
stop-gradients send the losses' gradients, jit, bad input.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hitlib import vq
from hitlib.reference import vq as ref

# parity needs true float32 products (conftest.py)
pytestmark = pytest.mark.usefixtures("full_float32_precision")


def brute_distances(z_e, codebook):
    "float64 |z - e_k|² straight from the differences: [..., K]."
    z = np.asarray(z_e, np.float64)
    codes = np.asarray(codebook, np.float64)
    return np.sum((z[..., None, :] - codes) ** 2, axis=-1)


def assert_nearest(indices, z_e, codebook, rtol):
    """`indices` are the float64 nearest codes wherever the nearest code is clear (the
    second-nearest is more than `rtol` of the distance scale further); where it is not,
    the chosen code must be as near as the nearest within that tolerance."""
    distances = brute_distances(z_e, codebook)
    indices = np.asarray(indices)
    assert indices.shape == distances.shape[:-1]
    tolerance = rtol * (1.0 + np.abs(distances).max())
    chosen = np.take_along_axis(distances, indices[..., None], axis=-1)[..., 0]
    best = distances.min(axis=-1)
    np.testing.assert_allclose(chosen, best, rtol=0, atol=tolerance)
    if distances.shape[-1] > 1:
        ordered = np.sort(distances, axis=-1)
        clear = ordered[..., 1] - ordered[..., 0] > tolerance
        np.testing.assert_array_equal(indices[clear], distances.argmin(axis=-1)[clear])
    else:
        np.testing.assert_array_equal(indices, 0)


@st.composite
def vq_cases(draw):
    "(z_e [..., D], codebook [K, D]) float32, 0 to 3 leading dimensions, small K and D."
    leading = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=3)))
    num_codes, dim = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    z_e = rng.standard_normal(leading + (dim,)).astype(np.float32)
    codebook = rng.standard_normal((num_codes, dim)).astype(np.float32)
    return z_e, codebook


# NumPy: vectorised vs loops ----------------------------------------------------------


@given(vq_cases())
def test_nearest_codes_match_loops_float64(case):
    z_e, codebook = (np.asarray(a, np.float64) for a in case)
    indices = ref.nearest_codes(z_e, codebook)
    assert indices.shape == z_e.shape[:-1]
    loops = ref.nearest_codes_loops(z_e, codebook)
    assert_nearest(indices, z_e, codebook, rtol=1e-12)
    assert_nearest(loops, z_e, codebook, rtol=1e-12)
    distances = brute_distances(z_e, codebook)
    ordered = np.sort(distances, axis=-1)
    if distances.shape[-1] == 1 or np.all(ordered[..., 1] - ordered[..., 0] > 1e-9):
        np.testing.assert_array_equal(indices, loops)  # exact where nothing is tied
    np.testing.assert_allclose(
        ref.squared_distances(z_e, codebook), distances, rtol=1e-12, atol=1e-12
    )


def test_nearest_codes_match_loops_on_a_map():
    rng = np.random.default_rng(0)
    z_e, codebook = rng.standard_normal((2, 4, 4, 6)), rng.standard_normal((16, 6))
    np.testing.assert_array_equal(
        ref.nearest_codes(z_e, codebook), ref.nearest_codes_loops(z_e, codebook)
    )


def test_ties_go_to_the_lowest_index_in_every_version():
    rng = np.random.default_rng(1)
    codebook = rng.standard_normal((5, 3))
    repeated = np.concatenate([codebook, codebook])  # rows 5..9 copy rows 0..4
    z_e = rng.standard_normal((7, 3))
    expected = ref.nearest_codes_loops(z_e, codebook)
    assert expected.max() < 5
    np.testing.assert_array_equal(ref.nearest_codes(z_e, repeated), expected)
    np.testing.assert_array_equal(ref.nearest_codes_loops(z_e, repeated), expected)
    np.testing.assert_array_equal(vq.nearest_codes(jnp.asarray(z_e), repeated), expected)
    # a vector exactly on a code: distance zero, that code
    np.testing.assert_array_equal(ref.nearest_codes(codebook, codebook), np.arange(5))


def test_quantize_returns_the_chosen_rows():
    rng = np.random.default_rng(2)
    z_e, codebook = rng.standard_normal((3, 5, 4)), rng.standard_normal((6, 4))
    z_q, indices = ref.quantize(z_e, codebook)
    assert z_q.shape == z_e.shape
    np.testing.assert_array_equal(z_q, codebook[indices])
    np.testing.assert_array_equal(indices, ref.nearest_codes(z_e, codebook))


def test_vq_loss_values():
    z_e = np.array([[1.0, 2.0], [3.0, 4.0]])
    z_q = np.array([[1.0, 0.0], [3.0, 5.0]])  # squared errors 0, 4, 0, 1: mean 5/4
    assert ref.vq_losses(z_e, z_q) == (1.25, 0.25 * 1.25)
    assert ref.vq_losses(z_e, z_q, beta=1) == (1.25, 1.25)
    assert ref.vq_losses(z_e, z_e) == (0.0, 0.0)


def test_reconstruction_and_perceptual_loss_values():
    x = np.zeros((2, 4, 4, 1))
    x_hat = x.copy()
    x_hat[1, 2, 3, 0] = 4.0  # one pixel of 32 off by 4: mean 16/32
    assert ref.reconstruction_loss(x, x_hat) == 0.5
    f_x = np.ones((2, 8))
    f_x_hat = f_x.copy()
    f_x_hat[0] = 3.0  # 8 features of 16 off by 2: mean 4·8/16
    assert ref.perceptual_loss(f_x, f_x_hat) == 2.0
    for layer in (ref, vq):
        assert float(layer.reconstruction_loss(x, x_hat)) == 0.5
        assert float(layer.perceptual_loss(f_x, f_x_hat)) == 2.0


@pytest.mark.parametrize("layer", [ref, vq], ids=["numpy", "jax"])
def test_codebook_usage_uniform_collapsed_and_partial(layer):
    fraction, perplexity = layer.codebook_usage(np.arange(80) % 8, 8)
    assert float(fraction) == 1.0
    np.testing.assert_allclose(float(perplexity), 8.0, rtol=1e-6)
    fraction, perplexity = layer.codebook_usage(np.full((3, 4), 5), 8)
    assert float(fraction) == 1 / 8
    np.testing.assert_allclose(float(perplexity), 1.0, rtol=1e-6)
    # p = (1/2, 1/4, 1/4) over 16 codes: H = 1.5 log 2, perplexity 2**1.5
    fraction, perplexity = layer.codebook_usage(np.array([0, 0, 7, 15]), 16)
    assert float(fraction) == 3 / 16
    np.testing.assert_allclose(float(perplexity), 2**1.5, rtol=1e-6)


# JAX vs NumPy ------------------------------------------------------------------------


@given(vq_cases())
def test_jax_matches_numpy_float32(case):
    z_e_np, codebook_np = case
    z_e, codebook = jnp.asarray(z_e_np), jnp.asarray(codebook_np)
    expected = ref.squared_distances(z_e_np, codebook_np)
    scale = 1.0 + float(np.abs(expected).max())
    np.testing.assert_allclose(
        vq.squared_distances(z_e, codebook), expected, rtol=1e-5, atol=1e-6 * scale
    )
    z_q, indices = vq.quantize(z_e, codebook)
    assert_nearest(indices, z_e_np, codebook_np, rtol=1e-5)  # float32 near-ties aside
    z_q_ref, indices_ref = ref.quantize(z_e_np, codebook_np)
    distances = brute_distances(z_e_np, codebook_np)
    ordered = np.sort(distances, axis=-1)
    if distances.shape[-1] == 1 or np.all(ordered[..., 1] - ordered[..., 0] > 1e-4 * scale):
        np.testing.assert_array_equal(indices, indices_ref)  # exact: no near-tie
        np.testing.assert_array_equal(z_q, z_q_ref)
        np.testing.assert_allclose(
            vq.vq_losses(z_e, z_q), ref.vq_losses(z_e_np, z_q_ref), rtol=1e-5, atol=1e-7
        )
    np.testing.assert_array_equal(z_q, codebook_np[np.asarray(indices)])
    num_codes = codebook_np.shape[0]
    np.testing.assert_allclose(
        vq.codebook_usage(indices, num_codes),
        ref.codebook_usage(np.asarray(indices), num_codes),
        rtol=1e-5,
    )


def test_jax_matches_numpy_on_the_chapter_sizes():
    "Chapter 16b's check: [4, 8, 8, 16] against 64 codes, no near-tie, all exact."
    rng = np.random.default_rng(0)
    z_e_np = rng.standard_normal((4, 8, 8, 16)).astype(np.float32)
    codebook_np = rng.standard_normal((64, 16)).astype(np.float32)
    z_q, indices = vq.quantize(jnp.asarray(z_e_np), jnp.asarray(codebook_np))
    z_q_ref, indices_ref = ref.quantize(z_e_np, codebook_np)
    np.testing.assert_array_equal(indices, indices_ref)
    np.testing.assert_array_equal(indices, ref.nearest_codes_loops(z_e_np, codebook_np))
    np.testing.assert_array_equal(z_q, z_q_ref)
    np.testing.assert_allclose(
        vq.vq_losses(jnp.asarray(z_e_np), z_q), ref.vq_losses(z_e_np, z_q_ref), rtol=1e-5
    )
    x, x_hat = rng.uniform(-1, 1, (2, 2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        vq.reconstruction_loss(jnp.asarray(x), jnp.asarray(x_hat)),
        ref.reconstruction_loss(x, x_hat),
        rtol=1e-5,
    )
    f_x, f_x_hat = rng.standard_normal((2, 5, 128)).astype(np.float32)
    np.testing.assert_allclose(
        vq.perceptual_loss(jnp.asarray(f_x), jnp.asarray(f_x_hat)),
        ref.perceptual_loss(f_x, f_x_hat),
        rtol=1e-5,
    )


# Gradients ---------------------------------------------------------------------------


def random_case(seed=3, shape=(2, 6, 6, 8), num_codes=32):
    rng = np.random.default_rng(seed)
    z_e = rng.standard_normal(shape).astype(np.float32)
    codebook = rng.standard_normal((num_codes, shape[-1])).astype(np.float32)
    return jnp.asarray(z_e), jnp.asarray(codebook), rng


def test_straight_through_gradient_is_exactly_the_identity():
    z_e, codebook, rng = random_case()
    w = jnp.asarray(rng.standard_normal(z_e.shape).astype(np.float32))

    def loss(z_e, codebook):
        z_q, _ = vq.quantize(z_e, codebook)
        return jnp.sum(w * vq.straight_through(z_e, z_q))

    grad_z_e, grad_codebook = jax.grad(loss, argnums=(0, 1))(z_e, codebook)
    np.testing.assert_array_equal(grad_z_e, w)
    np.testing.assert_array_equal(grad_codebook, 0.0)  # codes learn from their own loss
    z_q, _ = vq.quantize(z_e, codebook)
    bound = 2 * np.finfo(np.float32).eps * float(jnp.maximum(jnp.abs(z_e), jnp.abs(z_q)).max())
    assert float(jnp.abs(vq.straight_through(z_e, z_q) - z_q).max()) <= bound


def test_without_straight_through_the_encoder_gets_nothing():
    "The argmin has no gradient: this is what the straight-through estimator is for."
    z_e, codebook, _ = random_case()
    grad = jax.grad(lambda z: jnp.sum(vq.quantize(z, codebook)[0]))(z_e)
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_losses_send_their_gradients_to_the_codebook_only_and_the_encoder_only(beta):
    z_e, codebook, _ = random_case()
    num_codes, dim = codebook.shape

    def losses(z_e, codebook):
        z_q, _ = vq.quantize(z_e, codebook)
        return vq.vq_losses(z_e, z_q, beta=beta)

    z_q_ref, indices = ref.quantize(np.asarray(z_e), np.asarray(codebook))
    z64, zq64 = np.asarray(z_e, np.float64), z_q_ref.astype(np.float64)
    size = z64.size
    predicted_codebook = np.zeros((num_codes, dim))
    np.add.at(
        predicted_codebook, indices.reshape(-1), -2 / size * (z64 - zq64).reshape(-1, dim)
    )
    predicted_commitment = 2 * beta / size * (z64 - zq64)

    g_z_e, g_codebook = jax.grad(lambda *a: losses(*a)[0], argnums=(0, 1))(z_e, codebook)
    np.testing.assert_array_equal(g_z_e, 0.0)
    scale = np.abs(predicted_codebook).max()
    np.testing.assert_allclose(g_codebook, predicted_codebook, rtol=1e-5, atol=1e-6 * scale)
    unused = np.setdiff1d(np.arange(num_codes), indices)
    assert unused.size > 0  # 32 codes, 72 vectors: some are never chosen
    np.testing.assert_array_equal(np.asarray(g_codebook)[unused], 0.0)

    g_z_e, g_codebook = jax.grad(lambda *a: losses(*a)[1], argnums=(0, 1))(z_e, codebook)
    np.testing.assert_array_equal(g_codebook, 0.0)
    scale = np.abs(predicted_commitment).max()
    np.testing.assert_allclose(g_z_e, predicted_commitment, rtol=1e-5, atol=1e-6 * scale)


def test_jit_matches_eager():
    z_e, codebook, _ = random_case(seed=4)
    z_q, indices = vq.quantize(z_e, codebook)
    z_q_jit, indices_jit = jax.jit(vq.quantize)(z_e, codebook)
    np.testing.assert_array_equal(indices_jit, indices)
    np.testing.assert_array_equal(z_q_jit, z_q)
    np.testing.assert_allclose(jax.jit(vq.vq_losses)(z_e, z_q), vq.vq_losses(z_e, z_q), rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(vq.codebook_usage, static_argnums=1)(indices, 32),
        vq.codebook_usage(indices, 32),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        jax.jit(vq.straight_through)(z_e, z_q), vq.straight_through(z_e, z_q), rtol=0
    )


# Bad input ---------------------------------------------------------------------------

BAD_CALLS = {
    "codebook width": ("nearest_codes", ((4, 3), (8, 2)), "z_e has width D=3"),
    "codebook rank": ("quantize", ((4, 3), (8, 3, 1)), "codebook must have rank 2"),
    "empty codebook": ("squared_distances", ((4, 3), (0, 3)), "codebook must hold"),
    "z_e scalar": ("nearest_codes", ((), (8, 1)), "z_e must have shape [..., D]"),
    "z_q shape": ("vq_losses", ((4, 3), (4, 2)), "z_e and z_q must have the same shape"),
    "x_hat shape": (
        "reconstruction_loss",
        ((2, 32, 32, 1), (2, 32, 32, 3)),
        "x and x_hat must have the same shape",
    ),
    "f_x rank": ("perceptual_loss", ((128,), (128,)), "f_x must have rank 2 [N, F]"),
    "f_x_hat shape": ("perceptual_loss", ((2, 128), (2, 64)), "f_x and f_x_hat must"),
}


@pytest.mark.parametrize("case", BAD_CALLS, ids=list(BAD_CALLS))
def test_bad_shapes_refused_with_the_same_message_naming_the_argument(case):
    name, shapes, fragment = BAD_CALLS[case]
    messages = []
    for layer, xp in ((ref, np), (vq, jnp)):
        with pytest.raises(ValueError) as error:
            getattr(layer, name)(*(xp.zeros(s, xp.float32) for s in shapes))
        messages.append(str(error.value))
    assert fragment in messages[0]
    assert messages[0] == messages[1]


def test_straight_through_and_jit_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="z_e and z_q must have the same shape"):
        vq.straight_through(jnp.zeros((4, 3)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="z_e has width D=3"):
        jax.jit(vq.quantize)(jnp.zeros((4, 3)), jnp.zeros((8, 2)))


@pytest.mark.parametrize("layer", [ref, vq], ids=["numpy", "jax"])
@pytest.mark.parametrize("beta", [-0.5, float("nan"), "0.25", True])
def test_bad_beta_refused(layer, beta):
    with pytest.raises(ValueError, match="beta must be a number >= 0"):
        layer.vq_losses(np.zeros((2, 3)), np.zeros((2, 3)), beta=beta)


@pytest.mark.parametrize("layer", [ref, vq], ids=["numpy", "jax"])
def test_codebook_usage_refuses_bad_arguments(layer):
    with pytest.raises(ValueError, match="indices must be integers"):
        layer.codebook_usage(np.zeros(4, np.float32), 8)
    with pytest.raises(ValueError, match="indices must hold at least one index"):
        layer.codebook_usage(np.zeros((0, 3), np.int32), 8)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_codes must be a positive integer"):
            layer.codebook_usage(np.zeros(4, np.int32), bad)


def test_numpy_codebook_usage_refuses_indices_out_of_range():
    for indices in (np.array([0, 8]), np.array([-1, 2])):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, num_codes\)"):
            ref.codebook_usage(indices, 8)
