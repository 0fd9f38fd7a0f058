"""Chapter 10 (equations 2-3, R1, DiffAugment, bCR): NumPy vs loops and literal formulas, JAX vs NumPy, FD checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hitlib import discriminator as disc
from hitlib import losses
from hitlib.reference import discriminator as ref_disc
from hitlib.reference import losses as ref



# parity needs true float32 products (conftest.py)
pytestmark = pytest.mark.usefixtures("full_float32_precision")


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- adversarial losses

@given(st.integers(1, 40), st.integers(1, 40), st.floats(0.1, 25.0), st.sampled_from(["logistic", "hinge"]),
       st.integers(0, 2**16))
def test_stable_losses_equal_the_literal_formulas_where_safe(n_real, n_fake, scale, kind, seed):
    rng = _rng(seed)
    # |ℓ| <= 15: the literal log(1 - σ(ℓ)) is accurate to ~1e-9 in float64 (beyond, 1 - σ(ℓ) cancels)
    real = np.clip(rng.normal(0, scale, n_real), -15, 15)
    fake = np.clip(rng.normal(0, scale, n_fake), -15, 15)
    np.testing.assert_allclose(ref.discriminator_loss(real, fake, kind), ref.discriminator_loss_loops(real, fake, kind),
                               rtol=1e-8)
    np.testing.assert_allclose(ref.generator_loss(fake, kind), ref.generator_loss_loops(fake, kind), rtol=1e-8,
                               atol=1e-12)
    real32, fake32 = real.astype(np.float32), fake.astype(np.float32)
    np.testing.assert_allclose(float(losses.discriminator_loss(jnp.asarray(real32), jnp.asarray(fake32), kind)),
                               ref.discriminator_loss(real32, fake32, kind), rtol=1e-6)
    np.testing.assert_allclose(float(losses.generator_loss(jnp.asarray(fake32), kind)),
                               ref.generator_loss(fake32, kind), rtol=1e-6, atol=1e-7)


def test_stable_losses_at_extreme_logits():
    extreme = np.array([-1e4, -800.0, -40.0, 40.0, 800.0, 1e4])
    np.testing.assert_allclose(ref.softplus(extreme), [0.0, 0.0, np.exp(-40.0), 40.0, 800.0, 1e4], rtol=1e-14)
    assert np.all(np.isfinite(ref.discriminator_loss(extreme, extreme)))
    with np.errstate(over="ignore"):
        assert np.isinf(np.log1p(np.exp(800.0)))  # the naive form overflows
    x = jnp.asarray(extreme, jnp.float32)
    np.testing.assert_allclose(np.asarray(losses.softplus(x)), ref.softplus(extreme.astype(np.float32)), rtol=1e-6)
    grad = jax.grad(lambda l: losses.discriminator_loss(l, l) + losses.generator_loss(l))(x)
    assert bool(jnp.all(jnp.isfinite(grad)))
    # d/dℓ [softplus(-ℓ) + softplus(ℓ) + softplus(-ℓ)] / n = (σ(ℓ) - 2 σ(-ℓ)) / n
    expected = (jax.nn.sigmoid(x) - 2 * jax.nn.sigmoid(-x)) / x.shape[0]
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-6, atol=1e-9)


def test_hinge_values():
    real, fake = np.array([2.0, 0.5, -1.0]), np.array([-3.0, 0.0])
    assert ref.discriminator_loss(real, fake, "hinge") == pytest.approx((0 + 0.5 + 2.0) / 3 + (0 + 1.0) / 2)
    assert ref.generator_loss(fake, "hinge") == pytest.approx(1.5)


@pytest.mark.parametrize("module", [ref, losses], ids=["numpy", "jax"])
def test_loss_errors(module):
    xp = np if module is ref else jnp
    with pytest.raises(ValueError, match="kind must be one of \\('logistic', 'hinge'\\), got kind='wgan'"):
        module.discriminator_loss(xp.zeros(3), xp.zeros(3), kind="wgan")
    with pytest.raises(ValueError, match="kind must be one of"):
        module.generator_loss(xp.zeros(3), kind="")
    with pytest.raises(ValueError, match=r"real_logits must have rank 1 \[B\], got shape \(3, 1\)"):
        module.discriminator_loss(xp.zeros((3, 1)), xp.zeros(3))
    with pytest.raises(ValueError, match=r"fake_logits must have rank 1 \[B\]"):
        module.generator_loss(xp.zeros((3, 1)))


# ---------------------------------------------------------------- R1

def _tiny(params, images):
    x = images.reshape(images.shape[0], -1)
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return (h @ params["out"]["kernel"] + params["out"]["bias"])[:, 0]


def test_finite_differences_match_the_closed_form_gradient():
    params = jax.tree.map(lambda a: a.astype(np.float64), ref.init_tiny_discriminator(_rng(1), (4, 5, 3)))
    images = _rng(2).uniform(-1, 1, (2, 4, 5, 3))
    exact = ref.tiny_discriminator_input_gradient(params, images)
    numerical = ref.numerical_input_gradient(lambda x: ref.tiny_discriminator(params, x), images)
    np.testing.assert_allclose(numerical, exact, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(ref.r1_penalty_from_gradients(exact), ref.r1_penalty_loops(exact), rtol=1e-12)


def test_r1_definition_gamma_and_no_half():
    gradients = np.zeros((2, 2, 2, 1))
    gradients[0, 0, 0, 0], gradients[1, 1, 1, 0] = 3.0, 4.0  # ‖∇‖² = 9 and 16
    assert ref.r1_penalty_from_gradients(gradients) == pytest.approx(10.0 * (9 + 16) / 2)
    assert ref.r1_penalty_from_gradients(gradients, gamma=1.0) == pytest.approx(12.5)
    assert float(losses.r1_penalty_from_gradients(jnp.asarray(gradients, jnp.float32))) == pytest.approx(125.0)


@given(st.integers(1, 3), st.integers(2, 4), st.integers(2, 4), st.floats(0.1, 20.0), st.integers(0, 2**16))
def test_r1_jax_grad_equals_finite_differences(batch, height, width, gamma, seed):
    rng = _rng(seed)
    params = ref.init_tiny_discriminator(rng, (height, width, 3), hidden=5)
    params64 = jax.tree.map(lambda a: a.astype(np.float64), params)
    images = rng.uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)
    r1_fd = ref.r1_penalty_fd(lambda x: ref.tiny_discriminator(params64, x), images, gamma=gamma)
    r1_jax = losses.r1_penalty(lambda x: _tiny(jax.tree.map(jnp.asarray, params), x), jnp.asarray(images), gamma=gamma)
    np.testing.assert_allclose(float(r1_jax), r1_fd, rtol=2e-5, atol=1e-9)  # float32 autodiff vs float64 FD


def test_r1_on_the_real_discriminator_equals_finite_differences():
    config = ref_disc.DiscriminatorConfig(8, max_channels=4)
    params = ref_disc.init_discriminator_params(_rng(3), 8, max_channels=4, bias_std=0.1)
    params64 = jax.tree.map(lambda a: a.astype(np.float64), params)
    images = _rng(4).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    d = lambda x: disc.discriminator(jax.tree.map(jnp.asarray, params), x, config)
    r1_jax = float(jax.jit(lambda x: losses.r1_penalty(d, x))(jnp.asarray(images)))
    # piecewise linear in the input: a tiny epsilon gives exact slopes unless a kink is straddled
    r1_fd = ref.r1_penalty_fd(lambda x: ref_disc.discriminator(params64, x, config), images, epsilon=1e-7)
    np.testing.assert_allclose(r1_jax, r1_fd, rtol=1e-5)


def test_r1_gradient_with_respect_to_parameters():
    params = ref.init_tiny_discriminator(_rng(5), (3, 3, 3), hidden=4)
    params64 = jax.tree.map(lambda a: a.astype(np.float64), params)
    images = _rng(6).uniform(-1, 1, (2, 3, 3, 3))

    def r1_closed_form(p):
        return ref.r1_penalty_from_gradients(ref.tiny_discriminator_input_gradient(p, images))

    grads = jax.grad(lambda p: losses.r1_penalty(lambda x: _tiny(p, x), jnp.asarray(images, jnp.float32)))(
        jax.tree.map(jnp.asarray, params))
    direction = jax.tree.map(lambda a: _rng(7).standard_normal(a.shape), params64)
    step = 1e-6
    fd = (r1_closed_form(jax.tree.map(lambda a, v: a + step * v, params64, direction))
          - r1_closed_form(jax.tree.map(lambda a, v: a - step * v, params64, direction))) / (2 * step)
    autodiff = sum(float(jnp.sum(g * v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(autodiff, fd, rtol=1e-4)


def test_r1_errors():
    with pytest.raises(ValueError, match=r"gradients must have rank 4 \[B, H, W, C\], got shape \(2, 3\)"):
        ref.r1_penalty_from_gradients(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"images must have rank 4"):
        losses.r1_penalty(lambda x: x.sum(axis=(1, 2)), jnp.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match=r"images must have rank 4"):
        ref.numerical_input_gradient(lambda x: x.sum(axis=(1, 2)), np.zeros((2, 3, 3)))


# ---------------------------------------------------------------- DiffAugment

@st.composite
def augment_cases(draw):
    batch = draw(st.integers(1, 4))
    height, width = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    ops = draw(st.lists(st.sampled_from(ref.AUGMENTATIONS), min_size=0, max_size=4))
    seed = draw(st.integers(0, 2**16))
    return batch, height, width, ",".join(ops), seed


@given(augment_cases())
def test_numpy_augmentations_match_loops(case):
    batch, height, width, _, seed = case
    rng = _rng(seed)
    x = rng.uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)
    d = ref.sample_augment_params(rng, batch, height, width, "color,translation,cutout,flip")
    color = ref.adjust_contrast(ref.adjust_saturation(ref.adjust_brightness(x, d["brightness"]), d["saturation"]),
                                d["contrast"])
    np.testing.assert_allclose(color, ref.color_loops(x, d["brightness"], d["saturation"], d["contrast"]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ref.translate(x, d["translation"]), ref.translate_loops(x, d["translation"]))
    np.testing.assert_array_equal(ref.cutout(x, d["cutout"]), ref.cutout_loops(x, d["cutout"]))
    np.testing.assert_array_equal(ref.flip_horizontal(x, d["flip"]), ref.flip_loops(x, d["flip"]))


@given(augment_cases())
def test_jax_augment_equals_numpy_on_the_same_draws(case):
    batch, height, width, policy, seed = case
    x = _rng(seed).uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)
    draws = losses.sample_augment_params(jax.random.key(seed), batch, height, width, policy)
    draws_np = {k: np.asarray(v) for k, v in draws.items()}
    assert set(draws) == {k for name in ref.parse_policy(policy) for k in ref._DRAW_SHAPES[name]}
    expected = ref.apply_augment(x, draws_np, policy)
    actual = np.asarray(losses.apply_augment(jnp.asarray(x), draws, policy))
    if "color" in policy:
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)  # means: summation order may differ
        np.testing.assert_array_equal(actual == 0, expected == 0)
    else:
        np.testing.assert_array_equal(actual, expected)  # pure data movement and masking: exact
    np.testing.assert_array_equal(np.asarray(losses.augment(jnp.asarray(x), jax.random.key(seed), policy)), actual)


def test_draw_ranges_and_independence_of_operations():
    draws = {k: np.asarray(v) for k, v in
             losses.sample_augment_params(jax.random.key(0), 2048, 16, 20, "color,translation,cutout,flip").items()}
    assert draws["translation"][:, 0].min() == -2 and draws["translation"][:, 0].max() == 2  # round(16/8)
    assert draws["translation"][:, 1].min() == -3 and draws["translation"][:, 1].max() == 3  # round(20/8 = 2.5) = 3
    assert set(np.unique(draws["cutout"][:, 0])) == set(range(0, 17))  # k = 8, even: centres 0..16
    assert set(np.unique(draws["cutout"][:, 1])) == set(range(0, 21))  # k = 10, even: centres 0..20
    assert -0.5 <= draws["brightness"].min() and draws["brightness"].max() <= 0.5
    assert 0 <= draws["saturation"].min() and draws["saturation"].max() <= 2
    assert 0.5 <= draws["contrast"].min() and draws["contrast"].max() <= 1.5
    assert 0.45 < draws["flip"].mean() < 0.55
    # adding an operation does not change the other operations' draws
    fewer = losses.sample_augment_params(jax.random.key(0), 2048, 16, 20, "translation")
    np.testing.assert_array_equal(np.asarray(fewer["translation"]), draws["translation"])
    odd = np.asarray(losses.sample_augment_params(jax.random.key(1), 2048, 10, 10, "cutout")["cutout"])
    assert set(np.unique(odd)) == set(range(0, 10))  # k = 5, odd: centres 0..9
    numpy_draws = ref.sample_augment_params(_rng(0), 2048, 10, 10, "cutout,translation")
    assert set(np.unique(numpy_draws["cutout"])) == set(range(0, 10))
    assert set(np.unique(numpy_draws["translation"])) == {-1, 0, 1}


@pytest.mark.parametrize("module", [ref, losses], ids=["numpy", "jax"])
def test_translation_properties(module):
    xp = np if module is ref else jnp
    x = _rng(8).uniform(-1, 1, (3, 8, 10, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(module.translate(xp.asarray(x), xp.zeros((3, 2), xp.int32))), x)
    shifts = np.array([[1, 2], [-2, 0], [0, -3]], np.int32)
    y = np.asarray(module.translate(xp.asarray(x), xp.asarray(shifts)))
    np.testing.assert_array_equal(y[0, 1:, 2:], x[0, :-1, :-2])  # content moves down 1, right 2
    np.testing.assert_array_equal(y[0, :1], 0)
    np.testing.assert_array_equal(y[0, :, :2], 0)
    np.testing.assert_array_equal(y[1, :-2], x[1, 2:])  # up 2
    np.testing.assert_array_equal(y[2, :, :-3], x[2, :, 3:])  # left 3
    np.testing.assert_array_equal(y[2, :, -3:], 0)
    far = np.asarray(module.translate(xp.asarray(x), xp.asarray(np.array([[8, 0], [0, 10], [-9, -11]], np.int32))))
    np.testing.assert_array_equal(far, 0)  # shifted entirely out


@pytest.mark.parametrize("module", [ref, losses], ids=["numpy", "jax"])
def test_cutout_zeroes_exactly_the_expected_square(module):
    xp = np if module is ref else jnp
    height, width = 8, 12  # square 4 × 6
    x = _rng(9).uniform(0.5, 1.0, (4, height, width, 2)).astype(np.float32)  # strictly positive pixels
    centres = np.array([[4, 6], [0, 0], [8, 12], [2, 11]], np.int32)
    y = np.asarray(module.cutout(xp.asarray(x), xp.asarray(centres)))
    expected_boxes = [(2, 6, 3, 9), (0, 2, 0, 3), (6, 8, 9, 12), (0, 4, 8, 12)]  # rows [r0, r1), cols [c0, c1)
    for b, (r0, r1, c0, c1) in enumerate(expected_boxes):
        zeroed = np.all(y[b] == 0, axis=-1)
        expected = np.zeros((height, width), bool)
        expected[r0:r1, c0:c1] = True
        np.testing.assert_array_equal(zeroed, expected)
        np.testing.assert_array_equal(y[b][~expected], x[b][~expected])
    assert (~np.asarray(module.cutout_mask(xp.asarray(centres), height, width))[0]).sum() == 4 * 6


@pytest.mark.parametrize("module", [ref, losses], ids=["numpy", "jax"])
def test_flip(module):
    xp = np if module is ref else jnp
    x = _rng(10).uniform(-1, 1, (3, 4, 5, 3)).astype(np.float32)
    y = np.asarray(module.flip_horizontal(xp.asarray(x), xp.asarray([True, False, True])))
    np.testing.assert_array_equal(y[0], x[0, :, ::-1])
    np.testing.assert_array_equal(y[1], x[1])
    np.testing.assert_array_equal(y[0, :, 0], x[0, :, 4])
    np.testing.assert_array_equal(np.asarray(module.flip_horizontal(xp.asarray(y), xp.asarray([True, False, True]))), x)


def test_flip_policy_flips_whole_images_half_the_time():
    x = _rng(11).uniform(-1, 1, (64, 4, 5, 3)).astype(np.float32)
    y = np.asarray(losses.augment(jnp.asarray(x), jax.random.key(0), "flip"))
    flipped = [np.array_equal(a, b[:, ::-1]) for a, b in zip(y, x)]
    kept = [np.array_equal(a, b) for a, b in zip(y, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


def test_colour_identities():
    x = _rng(12).uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    for module, xp in ((ref, np), (losses, jnp)):
        xj = xp.asarray(x)
        np.testing.assert_allclose(np.asarray(module.adjust_saturation(xj, xp.asarray(ones))), x, atol=1e-6)
        np.testing.assert_allclose(np.asarray(module.adjust_contrast(xj, xp.asarray(ones))), x, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(module.adjust_brightness(xj, xp.asarray(zeros))), x)
        grey = np.asarray(module.adjust_saturation(xj, xp.asarray(zeros)))
        np.testing.assert_allclose(grey, np.repeat(x.mean(-1, keepdims=True), 3, -1), rtol=1e-6, atol=1e-7)
        flat = np.asarray(module.adjust_contrast(xj, xp.asarray(zeros)))
        np.testing.assert_allclose(flat, np.broadcast_to(x.mean((1, 2, 3), keepdims=True), x.shape), rtol=1e-6,
                                   atol=1e-7)


def test_augment_jit_and_gradient():
    x = jnp.asarray(_rng(13).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32))
    jitted = jax.jit(losses.augment, static_argnames="policy")
    np.testing.assert_allclose(np.asarray(jitted(x, jax.random.key(1))),
                               np.asarray(losses.augment(x, jax.random.key(1))), rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda x: losses.augment(x, jax.random.key(1), "translation,cutout").sum())(x)
    draws = {k: np.asarray(v) for k, v in losses.sample_augment_params(jax.random.key(1), 4, 8, 8).items()}
    assert float(grad.sum()) == float(ref.apply_augment(np.ones((4, 8, 8, 3), np.float32), draws,
                                                        "translation,cutout").sum())


@pytest.mark.parametrize("policy", ["color,rotation", "colour", "translation,,cutout,zoom", "Color"])
def test_bad_policy_names(policy):
    bad = [name.strip() for name in policy.split(",") if name.strip() and name.strip() not in ref.AUGMENTATIONS][0]
    for call in (lambda: ref.parse_policy(policy),
                 lambda: ref.augment(np.zeros((1, 4, 4, 3)), _rng(), policy),
                 lambda: losses.augment(jnp.zeros((1, 4, 4, 3)), jax.random.key(0), policy),
                 lambda: losses.sample_augment_params(jax.random.key(0), 1, 4, 4, policy)):
        with pytest.raises(ValueError, match=f"unknown augmentation '{bad}'"):
            call()
    with pytest.raises(ValueError, match="policy must be a comma-separated string"):
        ref.parse_policy(["color"])
    assert ref.parse_policy("") == () and ref.parse_policy(" color , cutout ") == ("color", "cutout")


@pytest.mark.parametrize("module", [ref, losses], ids=["numpy", "jax"])
def test_bad_draws(module):
    xp = np if module is ref else jnp
    x = xp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match="draws has no 'contrast', which policy='color' needs"):
        module.apply_augment(x, {"brightness": xp.zeros(2), "saturation": xp.zeros(2)}, "color")
    with pytest.raises(ValueError, match=r"draws\['cutout'\] must have shape \(2, 2\) for a batch of 2, got \(2,\)"):
        module.apply_augment(x, {"cutout": xp.zeros(2, xp.int32)}, "cutout")
    with pytest.raises(ValueError, match=r"x must have rank 4"):
        module.apply_augment(xp.zeros((4, 4, 3)), {}, "")


# ---------------------------------------------------------------- bCR

def test_consistency_and_bcr_from_logits():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 6.0])
    assert ref.consistency_loss(a, b) == pytest.approx((0 + 4 + 9) / 3)
    assert ref.bcr_loss_from_logits(a, b, b, b) == pytest.approx(10 * 13 / 3)
    assert float(losses.bcr_loss_from_logits(jnp.asarray(a), jnp.asarray(b), jnp.asarray(a), jnp.asarray(a),
                                             weight=2.0)) == pytest.approx(2 * 13 / 3)
    for module, xp in ((ref, np), (losses, jnp)):
        with pytest.raises(ValueError, match=r"augmented_logits must have the shape of logits \(3,\), got \(2,\)"):
            module.consistency_loss(xp.zeros(3), xp.zeros(2))


def test_bcr_loss_matches_numpy_and_stops_gradient_through_the_augmentation():
    config = ref_disc.DiscriminatorConfig(8, max_channels=4)
    params = ref_disc.init_discriminator_params(_rng(14), 8, max_channels=4, bias_std=0.1)
    d = lambda images: disc.discriminator(jax.tree.map(jnp.asarray, params), images, config)
    real = _rng(15).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    fake = _rng(16).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    key_real, key_fake = jax.random.key(1), jax.random.key(2)
    bcr = float(losses.bcr_loss(d, jnp.asarray(real), jnp.asarray(fake), key_real, key_fake))
    d_ref = lambda images: ref_disc.discriminator(params, images, config)
    draws = [{k: np.asarray(v) for k, v in losses.sample_augment_params(key, 3, 8, 8).items()}
             for key in (key_real, key_fake)]
    expected = ref.bcr_loss_from_logits(d_ref(real), d_ref(ref.apply_augment(real, draws[0])),
                                        d_ref(fake), d_ref(ref.apply_augment(fake, draws[1])))
    np.testing.assert_allclose(bcr, expected, rtol=1e-5)
    # passing precomputed logits gives the same value
    same = losses.bcr_loss(d, jnp.asarray(real), jnp.asarray(fake), key_real, key_fake,
                           real_logits=d(jnp.asarray(real)), fake_logits=d(jnp.asarray(fake)))
    np.testing.assert_allclose(float(same), bcr, rtol=1e-6)
    # gradient wrt the real images flows only through d(real)
    grad = jax.grad(lambda r: losses.bcr_loss(d, r, jnp.asarray(fake), key_real, key_fake))(jnp.asarray(real))
    constant = d(losses.augment(jnp.asarray(real), key_real))
    expected_grad = jax.grad(lambda r: 10.0 * jnp.mean((d(r) - constant) ** 2))(jnp.asarray(real))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-5, atol=1e-8)


def test_full_discriminator_objective_is_jittable_and_differentiable():
    config = ref_disc.DiscriminatorConfig(8, max_channels=4)
    params = jax.tree.map(jnp.asarray, ref_disc.init_discriminator_params(_rng(17), 8, max_channels=4, bias_std=0.1))
    real = jnp.asarray(_rng(18).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32))
    fake = jnp.asarray(_rng(19).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32))

    @jax.jit
    def objective(params, key):
        d = lambda images: disc.discriminator(params, images, config)
        k1, k2 = jax.random.split(key)
        real_logits, fake_logits = d(real), d(fake)
        return (losses.discriminator_loss(real_logits, fake_logits) + losses.r1_penalty(d, real)
                + losses.bcr_loss(d, real, fake, k1, k2, real_logits=real_logits, fake_logits=fake_logits))

    value, grads = jax.value_and_grad(objective)(params, jax.random.key(0))
    assert bool(jnp.isfinite(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
