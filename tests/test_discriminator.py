"""Chapter 9 (section 4.2's ResNet discriminator): NumPy vs loops, JAX vs NumPy, Flax module vs NumPy, jit, grad, errors."""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from hitlib import discriminator as disc
from hitlib.reference import discriminator as ref
from hitlib.reference.discriminator import DiscriminatorConfig
from helpers import run_python



# parity needs true float32 products (conftest.py)
pytestmark = pytest.mark.usefixtures("full_float32_precision")


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- NumPy building blocks vs naive loops

@given(st.integers(1, 2), st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 4), st.integers(0, 2**16))
def test_conv2d_matches_loops(batch, height, width, c_in, c_out, kernel_size, seed):
    rng = _rng(seed)
    x = rng.standard_normal((batch, height, width, c_in)).astype(np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, c_in, c_out)).astype(np.float32)
    bias = rng.standard_normal(c_out).astype(np.float32)
    y = ref.conv2d(x, kernel, bias)
    assert y.shape == (batch, height, width, c_out)
    np.testing.assert_allclose(y, ref.conv2d_loops(x, kernel, bias), rtol=1e-5, atol=1e-5)


def test_conv2d_1x1_is_dense_and_offcentre_tap_shifts():
    rng = _rng(1)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    kernel = rng.standard_normal((1, 1, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(ref.conv2d(x, kernel), x @ kernel[0, 0], rtol=1e-6)
    shift = np.zeros((3, 3, 3, 3), np.float32)
    for c in range(3):
        shift[1, 2, c, c] = 1.0  # y[h, w] = x[h, w + 1]
    y = ref.conv2d(x, shift)
    np.testing.assert_array_equal(y[:, :, :-1], x[:, :, 1:])
    np.testing.assert_array_equal(y[:, :, -1], 0.0)


@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16))
def test_pools_match_loops(batch, half_h, half_w, channels, seed):
    x = _rng(seed).standard_normal((batch, 2 * half_h, 2 * half_w, channels)).astype(np.float32)
    assert ref.blur_pool(x).shape == (batch, half_h, half_w, channels)
    np.testing.assert_allclose(ref.blur_pool(x), ref.blur_pool_loops(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.avg_pool(x), ref.avg_pool_loops(x), rtol=1e-6, atol=1e-7)


def test_blur_filter_is_normalised_binomial():
    f = ref.blur_filter()
    np.testing.assert_allclose(f * 64, np.outer([1, 3, 3, 1], [1, 3, 3, 1]))
    assert f.sum() == pytest.approx(1.0, abs=1e-15)


def test_blur_pool_preserves_a_constant_image_away_from_the_border():
    value = 1.5
    pooled = ref.blur_pool(np.full((1, 12, 8, 2), value))[0, :, :, 0]  # [6, 4]
    np.testing.assert_allclose(pooled[1:-1, 1:-1], value, rtol=1e-15)  # interior: exactly constant
    np.testing.assert_allclose(pooled[0, 1:-1], value * 7 / 8, rtol=1e-15)  # one tap of 8/8 falls on zero padding
    np.testing.assert_allclose(pooled[1:-1, -1], value * 7 / 8, rtol=1e-15)
    np.testing.assert_allclose(pooled[[0, 0, -1, -1], [0, -1, 0, -1]], value * 49 / 64, rtol=1e-15)
    np.testing.assert_array_equal(ref.avg_pool(np.full((1, 4, 4, 1), value)), value)
    jax_pooled = np.asarray(disc.blur_pool(jnp.full((1, 12, 8, 2), value, jnp.float32)))[0, :, :, 0]
    np.testing.assert_allclose(jax_pooled, pooled, rtol=1e-6)


@given(st.integers(1, 3), st.sampled_from([1, 2, 4]), st.booleans(), st.integers(0, 2**16))
def test_minibatch_stddev_matches_loops(groups, group_size, oversized_group, seed):
    batch = groups * group_size
    if oversized_group:  # a group size larger than the batch means one group of the whole batch
        group_size = batch + 3
    x = _rng(seed).standard_normal((batch, 2, 3, 2)).astype(np.float32)
    y = ref.minibatch_stddev(x, group_size)
    assert y.shape == (batch, 2, 3, 3)
    np.testing.assert_allclose(y, ref.minibatch_stddev_loops(x, group_size), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(disc.minibatch_stddev(jnp.asarray(x), group_size)), y, rtol=1e-5)


# ---------------------------------------------------------------- configuration

def test_widths_follow_the_release():
    assert DiscriminatorConfig(1024, 2).widths == (32, 64, 128, 256, 512, 512, 512, 512, 512)
    assert DiscriminatorConfig(256, 2).widths == (128, 256, 512, 512, 512, 512, 512)
    assert DiscriminatorConfig(256, 1).widths == (64, 128, 256, 512, 512, 512, 512)
    assert DiscriminatorConfig(128, 1).widths == (128, 256, 512, 512, 512, 512)
    assert DiscriminatorConfig(8).resolutions == (8, 4) and DiscriminatorConfig(8).num_blocks == 1
    assert DiscriminatorConfig(64, max_channels=32).widths == (32, 32, 32, 32, 32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(resolution=96), "resolution must be a power of two >= 8, got resolution=96"),
    (dict(resolution=4), "resolution must be an integer >= 8, got resolution=4"),
    (dict(resolution=64.0), "resolution must be an integer >= 8, got resolution=64.0"),
    (dict(resolution=64, channel_multiplier=0), "channel_multiplier must be a positive integer, got channel_multiplier=0"),
    (dict(resolution=64, channel_multiplier=1.5), "channel_multiplier must be a positive integer"),
    (dict(resolution=64, max_channels=0), "max_channels must be a positive integer"),
    (dict(resolution=64, downsample="max"), "downsample must be one of ('blur', 'avg'), got downsample='max'"),
    (dict(resolution=64, minibatch_std="yes"), "minibatch_std must be a bool"),
])
def test_bad_configuration_raises_value_error(kwargs, message):
    with pytest.raises(ValueError) as error:
        DiscriminatorConfig(**kwargs)
    assert message in str(error.value)
    with pytest.raises(ValueError) as error:  # the Flax module validates before drawing weights
        disc.Discriminator(**kwargs, rngs=nnx.Rngs(0))
    assert message in str(error.value)


@pytest.mark.parametrize("module", [ref, disc], ids=["numpy", "jax"])
def test_bad_shapes_raise_value_error(module):
    xp = np if module is ref else jnp
    config = DiscriminatorConfig(16, max_channels=8)
    params = ref.init_discriminator_params(_rng(), 16, max_channels=8)
    message = r"images must have shape \[B, 16, 16, 3\] for resolution=16, got \(2, 16, 16, 1\)"
    with pytest.raises(ValueError, match=message):
        module.discriminator(params, xp.zeros((2, 16, 16, 1), xp.float32), config)
    with pytest.raises(ValueError, match="images must have rank 4"):
        module.discriminator(params, xp.zeros((16, 16, 3), xp.float32), config)
    with pytest.raises(ValueError, match="kernel expects C_in=4 channels, x has 3"):
        module.conv2d(xp.zeros((1, 4, 4, 3)), xp.zeros((3, 3, 4, 2)))
    with pytest.raises(ValueError, match="even height and width, got height=6, width=3"):
        module.blur_pool(xp.zeros((1, 6, 3, 2)))
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the group size 4"):
        module.minibatch_stddev(xp.zeros((6, 4, 4, 2)), 4)


# ---------------------------------------------------------------- JAX vs NumPy

def test_jax_layers_equal_numpy():
    rng = _rng(2)
    x = rng.standard_normal((2, 8, 6, 12)).astype(np.float32)
    for k in (1, 2, 3):
        kernel = (rng.standard_normal((k, k, 12, 5)) / (3 * k)).astype(np.float32)
        bias = rng.standard_normal(5).astype(np.float32)
        np.testing.assert_allclose(np.asarray(disc.conv2d(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias))),
                                   ref.conv2d(x, kernel, bias), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(disc.blur_pool(jnp.asarray(x))), ref.blur_pool(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(disc.avg_pool(jnp.asarray(x))), ref.avg_pool(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(disc.leaky_relu(jnp.asarray(x))), ref.leaky_relu(x))


@st.composite
def discriminator_cases(draw):
    resolution = draw(st.sampled_from([8, 16]))
    multiplier = draw(st.integers(1, 2))
    max_channels = draw(st.sampled_from([4, 8, 12]))
    kind = draw(st.sampled_from(["blur", "avg"]))
    mbstd = draw(st.booleans())
    group = draw(st.sampled_from([1, 2, 4]))
    batch = draw(st.sampled_from([1, 2, 4]))
    if batch % min(group, batch):
        batch = group
    seed = draw(st.integers(0, 2**16))
    config = DiscriminatorConfig(resolution, multiplier, kind, mbstd, max_channels, group)
    return config, batch, seed


@given(discriminator_cases())
def test_jax_discriminator_equals_numpy(case):
    config, batch, seed = case
    rng = _rng(seed)
    params = ref.init_discriminator_params(rng, config.resolution, config.channel_multiplier,
                                           max_channels=config.max_channels, minibatch_std=config.minibatch_std,
                                           bias_std=0.1)
    images = rng.uniform(-1, 1, (batch, config.resolution, config.resolution, 3)).astype(np.float32)
    expected = ref.discriminator(params, images, config)
    assert expected.shape == (batch,) and expected.dtype == np.float32
    actual = disc.discriminator(jax.tree.map(jnp.asarray, params), jnp.asarray(images), config)
    assert actual.shape == (batch,)
    # logits are sums of O(1) terms that cancel: float32 rounding leaves an absolute error ~1e-7 (atol stated)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-6)


def test_images_are_independent_without_minibatch_std():
    config = DiscriminatorConfig(16, max_channels=8)
    params = ref.init_discriminator_params(_rng(3), 16, max_channels=8, bias_std=0.1)
    images = _rng(4).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    together = ref.discriminator(params, images, config)
    alone = np.concatenate([ref.discriminator(params, images[i:i + 1], config) for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-7)


def test_downsample_kind_changes_the_function_not_the_parameters():
    params = ref.init_discriminator_params(_rng(5), 16, max_channels=8, bias_std=0.1)
    images = _rng(6).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    blur = ref.discriminator(params, images, DiscriminatorConfig(16, max_channels=8, downsample="blur"))
    avg = ref.discriminator(params, images, DiscriminatorConfig(16, max_channels=8, downsample="avg"))
    assert not np.allclose(blur, avg, rtol=1e-3)


# ---------------------------------------------------------------- jit and grad

def test_jit_and_input_gradient_against_finite_differences():
    config = DiscriminatorConfig(8, max_channels=8)
    params = ref.init_discriminator_params(_rng(7), 8, max_channels=8, bias_std=0.1)
    images = _rng(8).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    jax_params = jax.tree.map(jnp.asarray, params)
    jitted = jax.jit(disc.discriminator, static_argnums=2)
    np.testing.assert_allclose(np.asarray(jitted(jax_params, jnp.asarray(images), config)),
                               ref.discriminator(params, images, config), rtol=1e-5, atol=1e-6)
    grad = np.asarray(jax.jit(jax.grad(lambda x: disc.discriminator(jax_params, x, config).sum()))(jnp.asarray(images)))
    assert grad.shape == images.shape
    # central differences of the float64 oracle, element by element (piecewise linear: tiny epsilon is exact)
    params64 = jax.tree.map(lambda a: a.astype(np.float64), params)
    images64, eps = images.astype(np.float64), 1e-7
    fd = np.zeros_like(images64)
    for index in np.ndindex(*images.shape):
        plus, minus = images64.copy(), images64.copy()
        plus[index] += eps
        minus[index] -= eps
        fd[index] = (ref.discriminator(params64, plus, config).sum()
                     - ref.discriminator(params64, minus, config).sum()) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6 * np.abs(fd).max())


# ---------------------------------------------------------------- Flax module

def test_flax_module_state_maps_onto_the_reference_tree():
    model = disc.Discriminator(16, 2, minibatch_std=True, max_channels=8, mbstd_group_size=2, rngs=nnx.Rngs(0))
    exported = disc.discriminator_params(model)
    reference = ref.init_discriminator_params(_rng(), 16, 2, max_channels=8, minibatch_std=True)
    assert jax.tree.structure(exported) == jax.tree.structure(reference)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), exported, reference)
    config = DiscriminatorConfig(16, 2, minibatch_std=True, max_channels=8, mbstd_group_size=2)
    assert disc.parameter_count(config) == ref.count_parameters(reference) == ref.parameter_count(config)


@given(discriminator_cases())
def test_flax_module_equals_numpy_end_to_end(case):
    config, batch, seed = case
    rng = _rng(seed)
    model = disc.Discriminator(config.resolution, config.channel_multiplier, config.downsample, config.minibatch_std,
                               max_channels=config.max_channels, mbstd_group_size=config.mbstd_group_size,
                               rngs=nnx.Rngs(seed))
    images = rng.uniform(-1, 1, (batch, config.resolution, config.resolution, 3)).astype(np.float32)
    # its own weights, through the NumPy oracle
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(images))),
                               ref.discriminator(disc.discriminator_params(model), images, config),
                               rtol=1e-5, atol=1e-6)
    # NumPy weights with random biases, loaded into the module
    params = ref.init_discriminator_params(rng, config.resolution, config.channel_multiplier,
                                           max_channels=config.max_channels, minibatch_std=config.minibatch_std,
                                           bias_std=0.1)
    disc.load_discriminator_params(model, params)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(images))), ref.discriminator(params, images, config),
                               rtol=1e-5, atol=1e-6)


def test_flax_module_jit_and_grads_in_functional_form():
    model = disc.Discriminator(16, max_channels=8, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model, nnx.Param)
    images = jnp.asarray(_rng(9).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32))

    @jax.jit
    def loss(state, images):
        return nnx.merge(graphdef, state)(images).mean()

    grads_state, grads_images = jax.grad(loss, argnums=(0, 1))(state, images)
    assert grads_images.shape == images.shape
    leaves = jax.tree.leaves(grads_state)
    assert len(leaves) == len(jax.tree.leaves(state))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    out = nnx.jit(lambda m, x: m(x))(model, images)
    assert out.shape == (2,)


def _he_init(scale):
    return nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def test_layers_hold_nnx_layouts_and_draw_one_key_each():
    """`Conv` and `Dense` hold the leaves of nnx.Conv and nnx.Linear (a checkpoint loads into either), and each layer
    draws one key, its kernel's (NNX's draw one for the bias too): a seed gives the weights it always gave. Chapter 9b
    says why they are not NNX's layers."""
    pairs = [(lambda r: disc.Dense(12, 5, rngs=r), lambda r: nnx.Linear(12, 5, kernel_init=_he_init(2.0), rngs=r)),
             (lambda r: disc.Conv(3, 4, 6, rngs=r),
              lambda r: nnx.Conv(4, 6, (3, 3), kernel_init=_he_init(2.0), rngs=r)),
             (lambda r: disc.Conv(1, 4, 6, scale=1.0, use_bias=False, rngs=r),
              lambda r: nnx.Conv(4, 6, (1, 1), use_bias=False, kernel_init=_he_init(1.0), rngs=r))]
    for ours, theirs in pairs:
        a, b = (nnx.to_pure_dict(nnx.state(make(nnx.Rngs(0)), nnx.Param)) for make in (ours, theirs))
        assert jax.tree.structure(a) == jax.tree.structure(b)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    model = disc.Discriminator(16, max_channels=8, rngs=nnx.Rngs(3))
    layers = [(model.from_rgb, 2.0)]
    for block in model.blocks:
        layers += [(block.conv1, 2.0), (block.conv2, 2.0), (block.skip, 1.0)]
    layers += [(model.head.conv, 2.0), (model.head.dense, 2.0), (model.head.out, 1.0)]
    keys = nnx.Rngs(3)
    for layer, scale in layers:  # in the order they are built, one key each
        expected = _he_init(scale)(keys.params(), layer.kernel.shape, jnp.float32)
        np.testing.assert_array_equal(layer.kernel[...], expected)


def test_flax_initialisation_scale():
    params = disc.discriminator_params(disc.Discriminator(32, 2, max_channels=32, rngs=nnx.Rngs(0)))
    for kernel, scale in [(params["blocks"][0]["conv1"]["kernel"], 2.0), (params["blocks"][1]["skip"]["kernel"], 1.0),
                          (params["head"]["dense"]["kernel"], 2.0)]:
        target = np.sqrt(scale / np.prod(kernel.shape[:-1]))
        assert abs(kernel.std() / target - 1) < 0.15
        assert np.abs(kernel).max() <= 2 / 0.8796256610342398 * target * (1 + 1e-5)  # truncated at 2 std
    assert not np.any(params["from_rgb"]["bias"])


def test_load_rejects_mismatched_tree():
    model = disc.Discriminator(16, max_channels=8, rngs=nnx.Rngs(0))
    message = r"parameter \['blocks'\]\[0\]\['conv1'\]\['bias'\]: the model has shape \(8,\), the tree \(4,\)"
    with pytest.raises(ValueError, match=message):
        disc.load_discriminator_params(model, ref.init_discriminator_params(_rng(), 16, max_channels=4))


def test_parameter_counts_without_allocating():
    for resolution, m in [(128, 1), (256, 2), (64, 1)]:
        config = DiscriminatorConfig(resolution, m)
        assert disc.parameter_count(config) == ref.parameter_count(config)
    # FFHQ-256, m = 2, by hand: from-RGB 3,584; blocks 128->256 475,520, 256->512 1,901,312, 4 x 512->512 4,981,760;
    # head conv 2,359,808, dense 4,194,816, out 513
    assert disc.parameter_count(DiscriminatorConfig(256, 2)) == 28_862_593
    assert disc.parameter_count(DiscriminatorConfig(128, 1)) == 23_880_833


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4])
def test_tap_and_split_convolutions_equal_xlas_in_values_and_gradients(kernel_size):
    # conv2d takes the split form on a CPU; every form and every gradient must agree,
    # the even kernel sizes too (their 'SAME' padding is lopsided, mirrored backward)
    rng = np.random.default_rng(kernel_size)
    x = jnp.asarray(rng.standard_normal((2, 8, 6, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 5, 7)), jnp.float32)

    def loss(conv):
        return lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel)))

    def r1(conv):  # R1's double gradient: of the input gradient's norm, by both inputs
        return lambda x, kernel: jnp.sum(jax.grad(loss(conv))(x, kernel) ** 2)

    def close(a, b):  # float32 rounding, relative to the largest entry
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), np.max(np.abs(a - b))

    for conv in (disc.tap_conv2d, disc.split_conv2d):
        close(conv(x, kernel), disc.xla_conv2d(x, kernel))
        for objective in (loss, r1):
            for got, want in zip(jax.grad(objective(conv), (0, 1))(x, kernel),
                                 jax.grad(objective(disc.xla_conv2d), (0, 1))(x, kernel)):
                close(got, want)


def kernel_grad_loops(x, grad, padding):
    "∂L/∂kernel[i, j, c, o] = Σ_bhw x_padded[b, h + i, w + j, c] · grad[b, h, w, o], by loops."
    batch, height, width, channels = x.shape
    k_h, k_w = (sum(pair) + 1 for pair in padding)
    padded = np.pad(x.astype(np.float64), ((0, 0), *padding, (0, 0)))
    out = np.zeros((k_h, k_w, channels, grad.shape[-1]))
    for i in range(k_h):
        for j in range(k_w):
            for b in range(batch):
                for h in range(height):
                    for w in range(width):
                        out[i, j] += np.outer(padded[b, h + i, w + j], grad[b, h, w])
    return out


# 'SAME' paddings of sizes 1-4 and their mirrors (the split form's backward pass uses both)
KERNEL_PADDINGS = [((0, 0), (0, 0)), ((0, 1), (0, 1)), ((1, 0), (1, 0)), ((1, 1), (1, 1)),
                   ((1, 2), (2, 1))]


@pytest.mark.parametrize("padding", KERNEL_PADDINGS)
def test_tap_kernel_grad_matches_loops(padding):
    rng = np.random.default_rng(sum(map(sum, padding)))
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    grad = rng.standard_normal((2, 5, 7, 4)).astype(np.float32)
    got = np.asarray(disc.tap_kernel_grad(jnp.asarray(x), jnp.asarray(grad), padding))
    want = kernel_grad_loops(x, grad, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_conv2d_takes_the_split_form_from_tap_min_channels_on_a_cpu():
    # which form conv2d runs is visible in the program: the split form's custom VJP
    def program(channels):
        x = jnp.zeros((1, 4, 4, channels))
        kernel = jnp.zeros((3, 3, channels, 2))
        return str(jax.make_jaxpr(disc.conv2d)(x, kernel))
    assert "custom_vjp_call" in program(disc.TAP_MIN_CHANNELS)
    assert "custom_vjp_call" not in program(disc.TAP_MIN_CHANNELS - 1)


@pytest.mark.parametrize("kernel_size", [1, 2, 3])
def test_tap_convolution_matches_the_numpy_oracle(kernel_size):
    # 64 input channels: the width from which conv2d takes the tap form on a CPU
    rng = np.random.default_rng(10 + kernel_size)
    x = rng.standard_normal((2, 6, 5, disc.TAP_MIN_CHANNELS)).astype(np.float32)
    kernel = (rng.standard_normal((kernel_size, kernel_size, disc.TAP_MIN_CHANNELS, 3)) / 16).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    want = ref.conv2d(x, kernel, bias)
    for got in (disc.tap_conv2d(jnp.asarray(x), jnp.asarray(kernel)) + bias,
                disc.split_conv2d(jnp.asarray(x), jnp.asarray(kernel)) + bias,
                disc.conv2d(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias))):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


SHARDED_R1 = textwrap.dedent("""
    import contextlib
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from hitlib import discriminator as disc, losses
    from hitlib.scaling import data_mesh
    assert jax.device_count() == 4
    # 64 channels from the first block on: conv2d takes the split form
    graphdef, params = nnx.split(disc.Discriminator(16, max_channels=64, rngs=nnx.Rngs(0)), nnx.Param)
    images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3), minval=-1.0, maxval=1.0)

    def objective(params, images):
        d = nnx.merge(graphdef, params)
        return jnp.mean(jax.nn.softplus(d(images))) + losses.r1_penalty(d, images, 10.0)

    assert "custom_vjp" in str(jax.make_jaxpr(objective)(params, images))
    want = jax.jit(jax.grad(objective))(params, images)
    # hitlib's mesh (axes Auto) and jax.make_mesh's default (axes Explicit, set as the mesh)
    for mesh, scope in ((data_mesh(), contextlib.nullcontext),
                        (jax.make_mesh((4,), ("data",)), jax.set_mesh)):
        sharded = (jax.device_put(params, NamedSharding(mesh, P())),
                   jax.device_put(images, NamedSharding(mesh, P("data"))))
        with scope(mesh):
            got = jax.jit(jax.grad(objective))(*sharded)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            scale = float(jnp.max(jnp.abs(b)))
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale, (mesh, scale)
    print("sharded R1 ok")
""")


def test_split_convolution_gradients_with_r1_sharded_over_4_devices():
    # the split form's kernel gradient contracts over the batch, which a data mesh
    # splits: one device and four (either kind of mesh axis) give the same gradients
    result = run_python(["-c", SHARDED_R1], devices=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded R1 ok" in result.stdout
