"""Chapter 16c (VQ-HiT, section 4.3 and appendix A.5): the encoder, HiT as the decoder,
equations 4 and 5 with the VQ losses, the training step, the presets.

Shapes for a few configurations, the straight-through gradient reaching the encoder,
the codebook and the decoder, each loss term against its formula, one training step
(finite, deterministic), the full-size preset's parameter count, bad configurations.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hitlib import config as generator_config
from hitlib.config import get_config
from hitlib.digit_features import DigitClassifier
from hitlib.discriminator import Discriminator
from hitlib.vq_hit import (
    VQHiT,
    VQHiTConfig,
    VQTrainConfig,
    create_vq_train_state,
    discriminator_objective,
    get_vq_hit_config,
    init_codebook,
    make_vq_train_step,
    parameter_counts,
    reconstruction_metrics,
    vq_hit_loss,
)

# the loss terms are compared with their formulas in float32 (conftest.py)
pytestmark = pytest.mark.usefixtures("full_float32_precision")

SMALL_DECODER = {"norm": "layer", "widths": (16, 8, 4), "num_heads": (2, 2, 2)}


def small_config(**fields) -> VQHiTConfig:
    "A 32×32 VQ-HiT small enough for a test: 8-wide encoder, 16 codes of length 4."
    values = {
        "name": "test",
        "resolution": 32,
        "encoder_widths": (8, 8, 8),
        "embedding_dim": 4,
        "num_codes": 16,
        "decoder": get_config("tiny", SMALL_DECODER),
    }
    values.update(fields)
    return VQHiTConfig(**values)


def images(batch: int, seed: int = 0, resolution: int = 32):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32)
    return jnp.asarray(x)


# jitted: eager op-by-op calls are several times slower on a CPU
forward = nnx.jit(lambda model, x: model(x))


@pytest.mark.parametrize(
    "config, grid",
    [
        (small_config(), 8),  # two halvings: 32 -> 8, the decoder's first stage
        (small_config(encoder_widths=(8, 8)), 16),  # one halving, folded 2×2
        (small_config(encoder_widths=(8,)), 32),  # no halving, folded 4×4
        (small_config(embedding_dim=3, num_codes=5), 8),
        (
            small_config(
                decoder=get_config("tiny", dict(SMALL_DECODER, num_layers=(2, 1, 2)))
            ),
            8,
        ),
    ],
)
def test_round_trip_shapes(config, grid):
    assert config.grid_size == grid and config.patch == grid // 8
    model = VQHiT(config, rngs=nnx.Rngs(0))
    x = images(2)
    x_hat, aux = forward(model, x)
    assert x_hat.shape == x.shape and x_hat.dtype == jnp.float32
    dim = config.embedding_dim
    assert aux["z_e"].shape == aux["z_q"].shape == (2, grid, grid, dim)
    assert aux["indices"].shape == (2, grid, grid)
    assert int(aux["indices"].min()) >= 0
    assert int(aux["indices"].max()) < config.num_codes
    # the quantised grid is made of codebook rows, the nearest ones
    codebook = np.asarray(model.codebook[...])
    np.testing.assert_array_equal(aux["z_q"], codebook[np.asarray(aux["indices"])])
    distances = np.sum(
        (np.asarray(aux["z_e"])[..., None, :] - codebook) ** 2, axis=-1
    )  # [B, g, g, K]
    chosen = np.take_along_axis(distances, np.asarray(aux["indices"])[..., None], -1)
    np.testing.assert_allclose(chosen[..., 0], distances.min(-1), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(x_hat)).all()


def test_full_size_forward_shapes_without_allocating():
    config = get_vq_hit_config("vq-hit-b-256")
    x_hat, aux = jax.eval_shape(
        lambda: VQHiT(config, rngs=nnx.Rngs(0))(jnp.zeros((1, 256, 256, 3)))
    )
    assert x_hat.shape == (1, 256, 256, 3)
    assert aux["z_q"].shape == (1, 16, 16, 16)
    assert aux["indices"].shape == (1, 16, 16)


def split(model):
    return nnx.split(model, nnx.Param, ...)


def test_gradient_reaches_encoder_codebook_and_decoder():
    config = small_config()
    model = VQHiT(config, rngs=nnx.Rngs(0))
    x = images(2)
    init_codebook(model, x, jax.random.key(0))
    graphdef, params, rest = split(model)

    def reconstruction_only(params):
        x_hat, _ = nnx.merge(graphdef, params, rest, copy=True)(x)
        return jnp.mean((x - x_hat) ** 2)

    def with_vq_losses(params):
        loss, _ = vq_hit_loss(
            nnx.merge(graphdef, params, rest, copy=True),
            lambda images: jnp.zeros(images.shape[0]),  # a discriminator of zeros
            lambda images: images.reshape(images.shape[0], -1)[:, :8],
            x,
            VQTrainConfig(),
        )
        return loss

    norms = {
        name: {key: float(optax.tree.norm(g[key])) for key in g}
        for name, g in (
            ("reconstruction", jax.jit(jax.grad(reconstruction_only))(params)),
            ("total", jax.jit(jax.grad(with_vq_losses))(params)),
        )
    }
    # straight through: the pixel loss trains encoder and decoder, not the codebook
    assert norms["reconstruction"]["encoder"] > 0
    assert norms["reconstruction"]["decoder"] > 0
    assert norms["reconstruction"]["codebook"] == 0.0
    # the codebook loss trains the codes
    assert all(value > 0 for value in norms["total"].values()), norms


def test_loss_terms_equal_their_definitions():
    config = small_config()
    model = VQHiT(config, rngs=nnx.Rngs(1))
    discriminator = Discriminator(32, max_channels=8, rngs=nnx.Rngs(2))
    classifier = DigitClassifier(nnx.Rngs(3))
    train = VQTrainConfig(perceptual_weight=0.3, adversarial_weight=0.2, r1_gamma=7.0)
    x = images(3, seed=1)

    @nnx.jit
    def everything(model, discriminator, classifier, x):
        features = classifier.features
        loss, (terms, x_hat) = vq_hit_loss(model, discriminator, features, x, train)
        _, aux = model(x)
        _, d_terms = discriminator_objective(discriminator, x, x_hat, train)
        gradients = jax.grad(lambda images: jnp.sum(discriminator(images)))(x)
        outputs = (features(x), features(x_hat), discriminator(x_hat), discriminator(x))
        return loss, terms, x_hat, aux, d_terms, gradients, outputs

    loss, terms, x_hat, aux, d_terms, gradients, outputs = everything(
        model, discriminator, classifier, x
    )
    f_x, f_hat, logits, real = (np.asarray(a, np.float64) for a in outputs)
    z_e, z_q = np.asarray(aux["z_e"], np.float64), np.asarray(aux["z_q"], np.float64)
    x64, x_hat64 = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    expected = {
        "reconstruction": np.mean((x64 - x_hat64) ** 2),
        "perceptual": np.mean((f_x - f_hat) ** 2),
        "adversarial": np.mean(np.log1p(np.exp(-logits))),  # -log sigmoid
        "codebook": np.mean((z_e - z_q) ** 2),
        "commitment": config.beta * np.mean((z_e - z_q) ** 2),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
    total = (
        expected["reconstruction"]
        + 0.3 * expected["perceptual"]
        + 0.2 * expected["adversarial"]
        + expected["codebook"]
        + expected["commitment"]
    )
    np.testing.assert_allclose(loss, total, rtol=1e-5)

    # equation 4: logistic loss on reals and reconstructions, plus γ·R1 on the reals
    np.testing.assert_allclose(
        d_terms["d_loss"],
        np.mean(np.log1p(np.exp(-real))) + np.mean(np.log1p(np.exp(logits))),
        rtol=1e-5,
    )
    r1 = 7.0 * np.mean(np.sum(np.asarray(gradients, np.float64) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(d_terms["r1"], r1, rtol=1e-5)


@pytest.fixture(scope="module")
def one_step():
    "Two identical states built from seed 0, the jitted step, a batch."
    config = small_config()
    train = VQTrainConfig(learning_rate=1e-3, perceptual_weight=0.1, d_max_channels=8)
    features = DigitClassifier(nnx.Rngs(3))
    x = images(4, seed=2)
    built = []
    for _ in range(2):
        model = VQHiT(config, rngs=nnx.Rngs(0))
        init_codebook(model, x, jax.random.key(0))
        built.append(create_vq_train_state(model, features, train, seed=0))
    (networks, state), (_, state_again) = built
    return make_vq_train_step(networks), state, state_again, x


def test_one_training_step_is_finite_and_deterministic(one_step):
    step, state, state_again, x = one_step
    new, metrics = step(state, x)
    again, metrics_again = step(state_again, x)
    assert int(new.step) == 1
    assert set(metrics) >= {
        "reconstruction",
        "perceptual",
        "adversarial",
        "codebook",
        "commitment",
        "d_loss",
        "r1",
        "loss",
    }
    for name, value in metrics.items():
        assert np.isfinite(float(value)), name
    leaves = jax.tree.leaves(new)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
    for a, b in zip(leaves, jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(metrics), jax.tree.leaves(metrics_again)):
        np.testing.assert_array_equal(a, b)
    # every part of the auto-encoder and the discriminator moved
    for part in ("encoder", "codebook", "decoder"):
        moved = jax.tree.map(
            lambda a, b: jnp.any(a != b), new.params[part], state.params[part]
        )
        assert any(jax.tree.leaves(moved)), part
    assert any(
        jax.tree.leaves(
            jax.tree.map(lambda a, b: jnp.any(a != b), new.d_params, state.d_params)
        )
    )


def test_reconstruction_metrics():
    model = VQHiT(small_config(), rngs=nnx.Rngs(0))
    x = np.asarray(images(4, seed=3))
    metrics = reconstruction_metrics(model, x, batch_size=2)
    x_hat, aux = forward(model, jnp.asarray(x))
    mse = float(np.mean((x - np.asarray(x_hat)) ** 2))
    np.testing.assert_allclose(metrics["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(metrics["psnr"], 10 * np.log10(4 / mse), rtol=1e-5)
    used = len(np.unique(np.asarray(aux["indices"])))
    np.testing.assert_allclose(metrics["usage"], used / 16, rtol=1e-6)
    assert 1 <= metrics["perplexity"] <= used + 1e-4
    with pytest.raises(ValueError, match="batch_size=3"):
        reconstruction_metrics(model, x, batch_size=3)


def test_full_size_parameter_count():
    config = get_vq_hit_config("vq-hit-b-256")
    counts = parameter_counts(config)
    # the decoder: HiT-B's stages (chapter 6's count from the configuration), the
    # codes' two projections (4·16 -> 512 for the 8×8 input, 16·16 -> 512 for Z),
    # P_Z [16, 512] and Z's norm
    stages = sum(generator_config.parameter_counts(config.decoder)["stages"])
    assert (
        counts["decoder"]
        == stages + (64 + 1) * 512 + (256 + 1) * 512 + 16 * 512 + 2 * 512
    )
    assert counts["codebook"] == 1024 * 16
    # the encoder: from-RGB, four downsampling residual blocks, the 3×3 conv to 16
    widths = (128, 128, 256, 256, 512)

    def conv(k, c_in, c_out, bias=True):
        return k * k * c_in * c_out + c_out * bias

    encoder = conv(3, 3, 128) + conv(3, 512, 16)
    for c, c_next in itertools.pairwise(widths):
        encoder += conv(3, c, c) + conv(3, c, c_next) + conv(1, c, c_next, False)
    assert counts["encoder"] == encoder
    assert counts == {
        "encoder": 4_011_408,
        "codebook": 16_384,
        "decoder": counts["decoder"],
        "total": 4_011_408 + 16_384 + counts["decoder"],
    }
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"encoder_widths": ()}, "encoder_widths"),  # no levels
        ({"encoder_widths": (8, 8, 8, 8)}, "encoder_widths"),  # a 4×4 grid
        ({"encoder_widths": [8, 8, 8]}, "encoder_widths"),  # not a tuple
        ({"encoder_widths": (8, 0, 8)}, "encoder_widths[1]"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"num_codes": 1}, "num_codes"),
        ({"beta": -1.0}, "beta"),
        ({"resolution": 48}, "resolution"),
        ({"resolution": 64}, "resolution"),  # the decoder makes 32×32
        ({"decoder": "tiny"}, "decoder"),
    ],
)
def test_bad_configuration_names_the_field(fields, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        small_config(**fields)


def test_unknown_preset_and_bad_init():
    with pytest.raises(ValueError, match="vq-hit-tiny"):
        get_vq_hit_config("vq-hit-small")
    model = VQHiT(small_config(num_codes=200), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_codes=200"):
        init_codebook(model, images(2), jax.random.key(0))  # 2·64 = 128 vectors
