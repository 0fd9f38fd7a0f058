"""Chapter 1 (Algorithm 3, pixel shuffle): NumPy vs naive loops, JAX vs NumPy, round trips and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hitlib import blocking
from hitlib.reference import blocking as ref


@st.composite
def feature_maps(draw):
    "A random float32 map [B, H, W, C] and a block size dividing H and W."
    p = draw(st.sampled_from([1, 2, 3, 4]))
    batch = draw(st.integers(1, 2))
    height, width = p * draw(st.integers(1, 4)), p * draw(st.integers(1, 4))
    channels = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).standard_normal((batch, height, width, channels)).astype(np.float32)
    return x, p


@given(feature_maps())
def test_block_matches_loops_and_round_trips(case):
    x, p = case
    batch, height, width, channels = x.shape
    y = ref.block(x, p)
    assert y.shape == (batch, (height // p) * (width // p), p * p, channels)
    np.testing.assert_array_equal(y, ref.block_loops(x, p))
    np.testing.assert_array_equal(ref.unblock(y, height, width), x)
    np.testing.assert_array_equal(ref.unblock_loops(y, height, width), x)


@given(feature_maps())
def test_jax_block_equals_numpy(case):
    x, p = case
    height, width = x.shape[1:3]
    np.testing.assert_array_equal(np.asarray(blocking.block(jnp.asarray(x), p)), ref.block(x, p))
    np.testing.assert_array_equal(np.asarray(blocking.unblock(jnp.asarray(ref.block(x, p)), height, width)), x)


@given(feature_maps())
def test_depth_to_space_matches_loops_and_inverts_space_to_depth(case):
    x, p = case
    s2d = ref.space_to_depth(x, p)
    np.testing.assert_array_equal(ref.depth_to_space(s2d, p), x)
    np.testing.assert_array_equal(ref.depth_to_space(s2d, p), ref.depth_to_space_loops(s2d, p))
    np.testing.assert_array_equal(np.asarray(blocking.space_to_depth(jnp.asarray(x), p)), s2d)
    np.testing.assert_array_equal(np.asarray(blocking.depth_to_space(jnp.asarray(s2d), p)), x)


def test_pixel_shuffle_and_upsample():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 8)).astype(np.float32)
    assert ref.pixel_shuffle(x).shape == (2, 6, 10, 2)
    np.testing.assert_array_equal(ref.pixel_shuffle(x), ref.depth_to_space_loops(x, 2))
    np.testing.assert_array_equal(np.asarray(blocking.pixel_shuffle(jnp.asarray(x))), ref.pixel_shuffle(x))
    np.testing.assert_array_equal(ref.upsample_nearest(x), ref.upsample_nearest_loops(x))
    np.testing.assert_array_equal(np.asarray(blocking.upsample_nearest(jnp.asarray(x))), ref.upsample_nearest(x))


def test_pixel_shuffle_follows_tensorflow_channel_order():
    # depth_to_space: output (h*2 + dy, w*2 + dx, c) reads input channel (dy*2 + dx)*C_out + c.
    planes = np.arange(4, dtype=np.float32).reshape(1, 1, 1, 4) * np.ones((1, 1, 1, 4), np.float32)
    np.testing.assert_array_equal(ref.pixel_shuffle(planes)[0, :, :, 0], [[0, 1], [2, 3]])


def test_jit_and_grad():
    x = np.random.default_rng(1).standard_normal((2, 8, 12, 3)).astype(np.float32)
    w = np.random.default_rng(2).standard_normal(ref.block(x, 4).shape).astype(np.float32)
    jitted = jax.jit(blocking.block, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(x), 4)), ref.block(x, 4))
    grad = jax.grad(lambda x: jnp.sum(blocking.block(x, 4) * w))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(grad), ref.unblock(w, 8, 12))


def test_balanced_block_size_reproduces_release():
    assert [ref.balanced_block_size(s, s) for s in (8, 16, 32, 64)] == [4, 4, 8, 8]
    for size in (8, 16, 32, 64, 128, 256):
        p = ref.balanced_block_size(size, size)
        assert size % p == 0


@pytest.mark.parametrize("module", [ref, blocking], ids=["numpy", "jax"])
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, xp: m.block(xp.zeros((1, 8, 8, 3)), 3), "block_size=3 does not divide the feature map: height=8, width=8"),
        (lambda m, xp: m.block(xp.zeros((1, 8, 12, 3)), 8), "block_size=8 does not divide the feature map: height=8, width=12"),
        (lambda m, xp: m.block(xp.zeros((8, 8, 3)), 2), "x must have rank 4 [B, H, W, C], got shape (8, 8, 3)"),
        (lambda m, xp: m.block(xp.zeros((1, 8, 8, 3)), 0), "block_size must be a positive integer, got block_size=0"),
        (lambda m, xp: m.unblock(xp.zeros((1, 4, 16, 3)), 8, 12), "M=4 blocks of 4x4 cannot tile height=8, width=12"),
        (lambda m, xp: m.unblock(xp.zeros((1, 4, 12, 3)), 8, 8), "tokens per block N=12 is not a square"),
        (lambda m, xp: m.unblock(xp.zeros((4, 16, 3)), 8, 8), "x must have rank 4 [B, M, N, C]"),
        (lambda m, xp: m.pixel_shuffle(xp.zeros((1, 4, 4, 6))), "channels divisible by block_size**2=4, got channels=6"),
        (lambda m, xp: m.depth_to_space(xp.zeros((1, 2, 2, 4)), 2.0), "block_size must be a positive integer, got block_size=2.0"),
        (lambda m, xp: m.block(xp.zeros((1, 8, 8, 3)), True), "block_size must be a positive integer, got block_size=True"),
    ],
)
def test_bad_input_names_the_argument(module, call, message):
    xp = np if module is ref else jnp
    with pytest.raises(ValueError) as error:
        call(module, xp)
    assert message in str(error.value)


@pytest.mark.parametrize("module", [ref, blocking], ids=["numpy", "jax"])
def test_numpy_integers_are_sizes_too(module):
    xp = np if module is ref else jnp
    assert module.depth_to_space(xp.zeros((1, 2, 2, 4)), np.int64(2)).shape == (1, 4, 4, 1)
    assert module.block(xp.zeros((1, 8, 8, 3)), np.int32(4)).shape == (1, 4, 16, 3)


_INTEGER_TYPES = [int, np.int8, np.int16, np.int32, np.int64]


@given(st.integers(-100, 100), st.integers(-3, 5), st.sampled_from(_INTEGER_TYPES))
def test_check_int_passes_exactly_the_integers_from_minimum(value, minimum, kind):
    if value >= minimum:
        got = ref.check_int(kind(value), "n", minimum)
        assert got == value and type(got) is int
    else:
        with pytest.raises(ValueError) as error:
            ref.check_int(kind(value), "n", minimum)
        assert str(error.value).startswith("n must be ") and str(error.value).endswith(f", got n={kind(value)!r}")


@given(st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.none(), st.complex_numbers(),
                 st.sampled_from([np.float32(2.0), np.bool_(True), np.array(3), [3], (3,)])))
def test_check_int_refuses_what_is_not_an_integer(value):
    with pytest.raises(ValueError, match="^n must be a positive integer, got n="):
        ref.check_int(value, "n")


@pytest.mark.parametrize("value, minimum, message", [
    (0, 1, "n must be a positive integer, got n=0"),
    (1, 2, "n must be an integer >= 2, got n=1"),
    (-1, 0, "n must be an integer >= 0, got n=-1"),
    (True, 1, "n must be a positive integer, got n=True"),
    (2.0, 1, "n must be a positive integer, got n=2.0"),
    ("4", 1, "n must be a positive integer, got n='4'"),
])
def test_check_int_message(value, minimum, message):
    with pytest.raises(ValueError) as error:
        ref.check_int(value, "n", minimum)
    assert str(error.value) == message
