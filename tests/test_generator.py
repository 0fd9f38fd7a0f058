"""Chapter 7: the Flax NNX generator equals the NumPy oracle on identical weights, per stage and end to end,
and so do its running statistics after a training step (Keras' unbiased variance); a stage runs one body, tiled
or not; parameter counts reproduce the paper; the forward pass and a gradient step shard over 8 host devices."""
import textwrap
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hitlib.config import ATTENTION_KINDS, PRESETS, get_config, parameter_counts
from hitlib.generator import Generator, Norm, load_reference_params, reference_params, summary
from hitlib.reference import generator as ref
from hitlib.reference.multi_axis import LAYER_ATTENTION_KINDS
from hitlib.reference import layers as ref_layers
from helpers import run_python

# float32 parity tolerance, end to end through every stage (stated in chapter 7b).
RTOL, ATOL = 2e-4, 2e-5
# float32 parity of the running statistics after one training call (chapter 7b): the 0.99·old term
# dominates, the measured difference is one float32 rounding or less; atol for the means (they cross zero).
STATS_RTOL, STATS_ATOL = 1e-5, 1e-7
MOMENTUM = 0.99  # Keras' BatchNormalization, the release's

SMALL = ["tiny", "norm=layer", "multi_query=false", "attention=full", "attention=axial", "attention=blocked_local",
         "attention=interleaved"]
# The switches of Tables 5-8 that chapter 6 added: unbalanced blocks, no cross-attention
# (Table 10's "only blocked multi-axis attention"), Table 5's latent-code conditioned
# INR decoder.
INR = "cross_attention=false attention_stages=0"
SWITCHES = ["block_sizes=2", "cross_attention=false", INR]


def small_config(variant="tiny"):
    "The small parity configuration with `variant` (space-separated overrides) applied."
    overrides = [] if variant == "tiny" else variant.split()
    if variant == "attention=interleaved":
        overrides.append("num_layers=2")
    return get_config("tiny", overrides + ["latent_dim=16", "widths=32,16,16", "num_heads=4,2,2"])


def random_pair(config, seed=0):
    "A Flax model and its NumPy reference tree holding the same random (non-trivial) weights."
    params = ref.init_generator_params(config, np.random.default_rng(seed), bias_std=0.05, random_norm=True)
    model = load_reference_params(Generator(config, rngs=nnx.Rngs(seed)), params)
    return model, params


def oracle_running_updates(params, z, config):
    """The NumPy oracle's running statistics after one training-mode `ref.generator` call, recorded at
    each batch norm (they all go through `normalize`):
    {id(norm params): (n values per channel, biased batch var, new {mean, var})}."""
    records, normalize = {}, ref_layers.normalize

    def recording(x, p, kind, eps=None, use_running_average=False):
        if kind == "batch" and not use_running_average:
            assert id(p) not in records  # every batch norm runs once per call
            records[id(p)] = (x.size // x.shape[-1], ref_layers.batch_moments(x)[1],
                              ref_layers.batch_norm_running_update(x, p, MOMENTUM))
        return normalize(x, p, kind, eps, use_running_average)

    with mock.patch.object(ref_layers, "normalize", recording):  # mlp_block and to_rgb
        with mock.patch.object(ref, "normalize", recording):  # the latent and the attention blocks
            ref.generator(params, z, config)
    return records


def batch_norm_paths(tree, path=()):
    "(path, params) of every batch norm in a chapter 7a tree."
    if isinstance(tree, dict) and set(tree) == {"scale", "bias", "mean", "var"}:
        yield path, tree
    elif isinstance(tree, (dict, list)):
        for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
            yield from batch_norm_paths(value, path + (key,))


@pytest.mark.parametrize("variant", SMALL + SWITCHES)
@pytest.mark.parametrize("train", [True, False])
def test_flax_equals_numpy_end_to_end(variant, train):
    config = small_config(variant)
    model, params = random_pair(config)
    z = np.random.default_rng(1).standard_normal((3, config.latent_dim)).astype(np.float32)
    expected = ref.generator(params, z, config, use_running_average=not train)
    actual = np.asarray(model(jnp.asarray(z), train=train))
    assert actual.shape == (3, config.resolution, config.resolution, 3)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("variant", ["tiny", "cross_attention=false", INR])
def test_flax_equals_numpy_per_stage(variant):
    config = small_config(variant)
    model, params = random_pair(config, seed=3)
    z = np.random.default_rng(2).standard_normal((2, config.latent_dim)).astype(np.float32)
    latent = None
    if config.cross_attention:
        latent = ref.latent_embedding(z, params["latent"], config)
        actual = np.asarray(model.latent(jnp.asarray(z), train=True))
        np.testing.assert_allclose(actual, latent, rtol=RTOL, atol=ATOL)
    x = np.random.default_rng(4).standard_normal((2, 8, 8, config.widths[0])).astype(np.float32)
    image = None
    for spec, stage, stage_params in zip(config.stages, model.stages, params["stages"]):
        expected_x, expected_image = ref.generator_stage(x, latent, image, stage_params, spec, config)
        latent_j = None if latent is None else jnp.asarray(latent)
        actual_x, actual_image = stage(jnp.asarray(x), latent_j,
                                       None if image is None else jnp.asarray(image), train=True)
        if expected_image is not None:
            np.testing.assert_allclose(np.asarray(actual_image), expected_image, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(actual_x), expected_x, rtol=RTOL, atol=ATOL)
        x, image = expected_x, expected_image


@pytest.mark.parametrize("variant, num_norms", [("tiny", 13), ("multi_query=false", 13),
                                               ("attention=axial", 13),
                                               ("cross_attention=false", 6), (INR, 6),
                                               ("modulation=duplex", 13)])
def test_training_mode_statistics_equal_numpy(variant, num_norms):
    """After one training-mode call on the same weights, every batch norm's running mean and var equal the
    oracle's (chapter 5a's `batch_norm_running_update` of that norm's input; rtol 1e-5, atol 1e-7), and
    nothing else moved."""
    config = small_config(variant)
    model, params = random_pair(config, seed=5)
    z = np.random.default_rng(6).standard_normal((3, config.latent_dim)).astype(np.float32)
    model(jnp.asarray(z), train=True)
    records, trained = oracle_running_updates(params, z, config), reference_params(model)
    after = dict(batch_norm_paths(trained))
    norms = list(batch_norm_paths(params))
    assert len(records) == len(norms) == len(after) == num_norms
    for path, p in norms:
        for key in ("mean", "var"):
            np.testing.assert_allclose(after[path][key], records[id(p)][2][key], rtol=STATS_RTOL,
                                       atol=STATS_ATOL, err_msg=f"{path} {key}")
            assert not np.array_equal(after[path][key], p[key])
    flat = jax.tree_util.tree_flatten_with_path(trained)[0]
    for (path, a), b in zip(flat, jax.tree.leaves(params), strict=True):
        if not jax.tree_util.keystr(path).endswith(("['mean']", "['var']")):
            np.testing.assert_array_equal(a, b)


def test_generator_running_variance_is_unbiased():
    """From zero running statistics one training call leaves (1 - m) times the batch statistic, so the
    factor shows: running var = (1 - m)·biased var·n/(n - 1) in every batch norm (rtol 1e-5). The biased
    update of before, (1 - m)·biased var, is 1/(n - 1) >= 3.3e-4 away (n <= 3072 here) and fails."""
    config = small_config()
    _, params = random_pair(config, seed=7)
    for _, p in batch_norm_paths(params):
        p["mean"], p["var"] = np.zeros_like(p["mean"]), np.zeros_like(p["var"])
    model = load_reference_params(Generator(config, rngs=nnx.Rngs(0)), params)
    z = np.random.default_rng(8).standard_normal((3, config.latent_dim)).astype(np.float32)
    model(jnp.asarray(z), train=True)
    records = oracle_running_updates(params, z, config)
    after = dict(batch_norm_paths(reference_params(model)))
    sizes = set()
    for path, p in batch_norm_paths(params):
        n, biased, expected = records[id(p)]
        sizes.add(n)
        var = after[path]["var"]
        np.testing.assert_allclose(var, (1 - MOMENTUM) * biased * n / (n - 1), rtol=1e-5, err_msg=str(path))
        np.testing.assert_allclose(var, expected["var"], rtol=1e-5, err_msg=str(path))
        assert np.all(var / ((1 - MOMENTUM) * biased) - 1 > 0.5 / (n - 1)), path  # not the biased variance
    assert sizes == {3 * 16, 3 * 64, 3 * 256, 3 * 1024}  # batch 3: the 16 latent tokens, 8×8, 16×16, 32×32


def test_norm_running_update_uses_n_over_n_minus_one():
    "One Norm, n = 6 per channel: running var = 0.99·1 + 0.01·biased·6/5; normalised with the biased."
    norm = Norm(3, "batch")
    x = jax.random.normal(jax.random.key(1), (2, 3, 3)) * 2 + 1  # [B, L, C]: n = B·L = 6
    y = np.asarray(norm(x, train=True)).reshape(-1, 3)
    flat = np.asarray(x, np.float64).reshape(-1, 3)
    biased = flat.var(0)
    var, mean = np.asarray(norm.var[...]), np.asarray(norm.mean[...])
    np.testing.assert_allclose(var, MOMENTUM + (1 - MOMENTUM) * biased * 6 / 5, rtol=1e-6)
    np.testing.assert_allclose(mean, (1 - MOMENTUM) * flat.mean(0), rtol=1e-5, atol=1e-7)
    assert np.all(var - (MOMENTUM + (1 - MOMENTUM) * biased) > 1e-3 * biased)  # the biased update: lower
    np.testing.assert_allclose(y.var(0), biased / (biased + 1e-3), rtol=1e-4)  # biased variance normalises
    with pytest.raises(ValueError, match="n = 1 value per channel"):
        Norm(3, "batch")(jnp.ones((1, 3)), train=True)


def test_weights_round_trip_and_mismatch_is_named():
    config = small_config()
    model, params = random_pair(config)
    back = reference_params(model)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    params["stages"][0]["pos"] = params["stages"][0]["pos"][:4]
    with pytest.raises(ValueError, match=r"\['stages'\]\[0\]\['pos'\]"):
        load_reference_params(model, params)


def test_batchnorm_statistics_update_only_in_training():
    config = small_config()
    model = Generator(config, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    z = jax.random.normal(jax.random.key(0), (4, config.latent_dim))
    model(z, train=False)
    same = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(same)))
    model(z, train=True)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.mark.parametrize("name, millions", [("hit-b-256", 46.22), ("hit-l-256", 97.46), ("hit-l-128", 67.60)])
def test_parameter_counts_reproduce_the_paper(name, millions):
    assert round(summary(get_config(name), flops=False)["params"] / 1e6, 2) == millions


@pytest.mark.parametrize("a, millions", [(0, 61.55), (1, 66.01), (2, 67.19), (3, 67.52), (4, 67.60)])
def test_table6_parameter_counts(a, millions):
    config = get_config("hit-l-128", [f"attention_stages={a}"])
    assert round(summary(config, flops=False)["params"] / 1e6, 2) == millions


# Table 5's rows where the paper gives a count (millions), as overrides of hit-l-128.
TABLE5 = [(INR, 42.68), ("attention_stages=0", 61.55), ("attention=full", 67.60),
          ("attention=axial", 67.60), ("attention=blocked_local", 67.60), ("", 67.60)]


@pytest.mark.parametrize("variant, millions", TABLE5)
def test_table5_parameter_counts(variant, millions):
    config = get_config("hit-l-128", variant.split())
    result = summary(config, flops=False)
    assert round(result["params"] / 1e6, 2) == millions
    assert result["params"] == parameter_counts(config)["total"]


@pytest.mark.parametrize("name, variant", [(name, "") for name in sorted(PRESETS)] + [
    ("hit-l-128", v) for v in (INR, "cross_attention=false", "attention=interleaved",
                               "block_sizes=4", "norm=layer", "multi_query=false")])
def test_summary_equals_chapter_6_parameter_counts(name, variant):
    "The model's variables, counted from shapes, equal chapter 6's formula, per stage."
    config = get_config(name, variant.split())
    result, formula = summary(config, flops=False), parameter_counts(config)
    assert result["params"] == formula["total"]
    assert result["params_input"] == formula["initial"] + formula["latent"]
    assert [stage["params"] for stage in result["stages"]] == formula["stages"]


@pytest.mark.parametrize("variant",
                         ["tiny"] + SWITCHES + ["multi_query=false", "norm=layer"])
def test_reference_tree_equals_chapter_6_parameter_counts(variant):
    config = get_config("tiny", [] if variant == "tiny" else variant.split())
    params = ref.init_generator_params(config, np.random.default_rng(0))
    formula = parameter_counts(config)
    assert ref.count_parameters(params) == formula["total"]
    per_stage = [ref.count_parameters(stage) for stage in params["stages"]]
    assert per_stage == formula["stages"]


def test_default_tree_is_unchanged_by_the_switch():
    "cross_attention=True (the default) draws the same weights in the same order."
    config = small_config()
    params = ref.init_generator_params(config, np.random.default_rng(0))
    assert list(params) == ["initial", "latent", "stages"]
    assert all(list(stage)[:2] == ["pos", "cross"] for stage in params["stages"])
    explicit = get_config("tiny", ["cross_attention=true", "latent_dim=16",
                                   "widths=32,16,16", "num_heads=4,2,2"])
    again = ref.init_generator_params(explicit, np.random.default_rng(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_inr_decoder_reads_z_through_the_initial_map_only():
    config = small_config(INR)
    model, params = random_pair(config, seed=2)
    assert model.latent is None and all(stage.cross is None for stage in model.stages)
    assert "latent" not in params
    assert not any("cross" in stage for stage in params["stages"])
    z = np.random.default_rng(3).standard_normal((2, config.latent_dim))
    z = z.astype(np.float32)
    images = ref.generator(params, z, config)
    assert images.shape == (2, 32, 32, 3) and np.all(np.isfinite(images))
    params["initial"]["kernel"] = params["initial"]["kernel"] + 0.1
    assert not np.allclose(ref.generator(params, z, config), images)
    result = summary(config)
    assert result["params_input"] == config.latent_dim * 64 * 32 + 64 * 32
    assert result["flops"] > 0
    with_cross = summary(small_config("attention_stages=0"))
    assert result["activation_mb"] < with_cross["activation_mb"]


def test_inr_decoder_gradients_reach_every_parameter():
    "No attention at all, so no key bias either: every parameter gets a gradient."
    config = small_config(INR)
    graphdef, params, stats = nnx.split(Generator(config, rngs=nnx.Rngs(0)), nnx.Param,
                                        nnx.BatchStat)
    z = jax.random.normal(jax.random.key(0), (2, config.latent_dim))

    @jax.jit
    def loss(params, stats, z):
        model = nnx.merge(graphdef, params, stats, copy=True)
        return jnp.mean((model(z, train=True) - 0.5) ** 2)

    grads = jax.tree.leaves(jax.grad(loss)(params, stats, z))
    assert grads and all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)


def test_tiled_inference_without_cross_attention(monkeypatch):
    "The high-resolution stages' tiles skip cross-attention when there is none."
    from hitlib import generator as generator_module
    monkeypatch.setattr(generator_module, "INFERENCE_TILE_TOKENS", 96)
    for variant in ("cross_attention=false", INR):
        config = small_config(variant)
        model, params = random_pair(config, seed=5)
        z = np.random.default_rng(6).standard_normal((3, config.latent_dim))
        z = z.astype(np.float32)
        expected = ref.generator(params, z, config, use_running_average=True)
        actual = np.asarray(model(jnp.asarray(z), train=False))
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_summary_stages_add_up():
    result = summary(get_config("tiny"))
    assert result["params"] == result["params_input"] + sum(s["params"] for s in result["stages"])
    assert result["flops"] > 0 and len(result["stages"]) == 3


def test_jit_grad_and_bfloat16():
    config = small_config()
    model = Generator(config, rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(0), (2, config.latent_dim))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def loss(params, stats, z):
        return jnp.mean(nnx.merge(graphdef, params, stats, copy=True)(z, train=True) ** 2)

    grads = jax.grad(loss)(params, stats, z)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads))
    low = Generator(get_config("tiny", ["latent_dim=16", "widths=32,16,16", "num_heads=4,2,2",
                                        "compute_dtype=bfloat16"]), rngs=nnx.Rngs(0))
    load_reference_params(low, reference_params(model))
    np.testing.assert_allclose(np.asarray(low(z)), np.asarray(model(z)), atol=0.1)


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from hitlib.config import get_config
    from hitlib.generator import Generator
    assert jax.device_count() == 8
    config = get_config("tiny", ["latent_dim=16", "widths=32,16,16", "num_heads=4,2,2"])
    graphdef, params, stats = nnx.split(Generator(config, rngs=nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    z = jax.random.normal(jax.random.key(1), (16, config.latent_dim))

    def loss(params, stats, z):
        return jnp.mean(nnx.merge(graphdef, params, stats, copy=True)(z, train=True) ** 2)

    def step(params, stats, z):
        value, grads = jax.value_and_grad(loss)(params, stats, z)
        return value, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    forward = jax.jit(lambda params, stats, z: nnx.merge(graphdef, params, stats, copy=True)(z, train=True))
    one_out, (one_loss, one_params) = forward(params, stats, z), jax.jit(step)(params, stats, z)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params_s, stats_s, z_s = jax.device_put(params, rep), jax.device_put(stats, rep), jax.device_put(z, dat)
    out = forward(params_s, stats_s, z_s)
    assert len(out.sharding.device_set) == 8, out.sharding
    loss_s, params_new = jax.jit(step)(params_s, stats_s, z_s)
    np.testing.assert_allclose(np.asarray(out), np.asarray(one_out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss_s), float(one_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_new), jax.tree.leaves(one_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    print("sharded ok")
""")


def test_forward_and_gradient_step_sharded_over_8_devices():
    result = run_python(["-c", SHARDED], devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded ok" in result.stdout


def test_tiled_inference_equals_the_oracle(monkeypatch):
    "High-resolution stages run tile by tile at inference; many small tiles give the oracle's numbers."
    from hitlib import generator as generator_module
    monkeypatch.setattr(generator_module, "INFERENCE_TILE_TOKENS", 96)  # 3 images x 32 pixels per tile: 32 tiles
    assert generator_module.tile_size(3, 32 * 32) == 32
    config = small_config()
    model, params = random_pair(config, seed=5)
    z = np.random.default_rng(6).standard_normal((3, config.latent_dim)).astype(np.float32)
    expected = ref.generator(params, z, config, use_running_average=True)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(z), train=False)), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("variant", ["tiny", "cross_attention=false", "norm=layer", "multi_query=false"])
def test_one_stage_body_tiled_or_not(variant):
    """Every stage runs `Stage.body`, on the whole map or tile by tile. At inference a high-resolution stage on
    32 tiles of 32 pixels gives the untiled numbers to float32 rounding (rtol 1e-6, atol 1e-6: the products run on
    other shapes); `tiled` changes nothing, bit for bit, where it does not apply (low-resolution stages, training)."""
    from hitlib import generator as generator_module
    config = small_config(variant)
    model, _ = random_pair(config, seed=9)
    data = np.random.default_rng(10)
    latent = None
    if config.cross_attention:
        latent = jnp.asarray(data.standard_normal((3, 16, config.widths[0])).astype(np.float32))
    image = None
    for spec, stage in zip(config.stages, model.stages):
        x = jnp.asarray(data.standard_normal((3, spec.resolution, spec.resolution, spec.width)).astype(np.float32))
        untiled = stage(x, latent, image, train=False, tiled=False)
        tiled = stage(x, latent, image, train=False, tiled=True)
        if spec.is_low_resolution:
            assert tiled[1] is None and untiled[1] is None
            np.testing.assert_array_equal(np.asarray(tiled[0]), np.asarray(untiled[0]))
        else:
            body = stage.body(x + stage.pos[...], latent)
            on_tiles = generator_module._on_tiles(lambda tile: stage.body(tile, latent), x + stage.pos[...], 96)
            for a, b in zip(on_tiles, body, strict=True):
                assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
            for a, b in zip(tiled, untiled, strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
        image = untiled[1]
    twins = [random_pair(config, seed=9)[0] for _ in range(2)]
    z = jnp.asarray(data.standard_normal((3, config.latent_dim)).astype(np.float32))
    outputs = []
    for twin, tiled in zip(twins, (True, False)):  # training mode writes statistics: one fresh model each
        x, latent, image = twin.initial(z).reshape(3, 8, 8, config.widths[0]), None, None
        if twin.latent is not None:
            latent = twin.latent(z, train=True)
        for stage in twin.stages:
            x, image = stage(x, latent, image, train=True, tiled=tiled)
        outputs.append((np.asarray(image), reference_params(twin)))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    for a, b in zip(jax.tree.leaves(outputs[0][1]), jax.tree.leaves(outputs[1][1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_stage_kind_resolves_to_layer_kinds():
    "A stage's kind (chapter 6, with interleaved) names one layer kind of chapter 3 (with dilated) per layer."
    for kind in ATTENTION_KINDS:
        layers = [ref.layer_attention_kind(kind, layer) for layer in range(4)]
        assert set(layers) <= set(LAYER_ATTENTION_KINDS), kind
        expected = ["blocked_local", "dilated"] * 2 if kind == "interleaved" else [kind] * 4
        assert layers == expected
    assert "interleaved" not in LAYER_ATTENTION_KINDS and "dilated" not in ATTENTION_KINDS


@pytest.mark.parametrize("batch, tokens, size", [(1, 65536, 8192), (32, 65536, 256), (32, 64, 64), (3, 1024, 1024),
                                                 (10000, 64, 1)])
def test_tile_size(batch, tokens, size):
    from hitlib.generator import tile_size
    assert tile_size(batch, tokens) == size


# --- duplex modulation (GANsformer's duplex attention, chapters 4a and 6) ---------------------------------------------

DUPLEX = ["modulation=duplex", "modulation=duplex multi_query=false", "modulation=duplex norm=layer",
          "modulation=duplex attention=axial", "modulation=duplex attention_stages=0"]


@pytest.mark.parametrize("variant", DUPLEX)
@pytest.mark.parametrize("train", [True, False])
def test_duplex_flax_equals_numpy_end_to_end(variant, train):
    "Same weights on both sides; the same tolerance as every other switch (RTOL, ATOL)."
    config = small_config(variant)
    model, params = random_pair(config)
    assert all(stage.latent_update is not None for stage in model.stages)
    z = np.random.default_rng(1).standard_normal((3, config.latent_dim)).astype(np.float32)
    expected = ref.generator(params, z, config, use_running_average=not train)
    actual = np.asarray(model(jnp.asarray(z), train=train))
    assert actual.shape == (3, config.resolution, config.resolution, 3)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_duplex_flax_equals_numpy_per_stage_and_carries_the_tokens():
    config = small_config("modulation=duplex")
    model, params = random_pair(config, seed=3)
    z = np.random.default_rng(2).standard_normal((2, config.latent_dim)).astype(np.float32)
    latent = ref.latent_embedding(z, params["latent"], config)
    x = np.random.default_rng(4).standard_normal((2, 8, 8, config.widths[0])).astype(np.float32)
    image = keys = None
    carried = []
    for spec, stage, stage_params in zip(config.stages, model.stages, params["stages"]):
        expected_x, expected_image, expected_keys = ref.generator_stage(
            x, latent, image, stage_params, spec, config, keys=keys)
        actual_x, actual_image, actual_keys = stage(
            jnp.asarray(x), jnp.asarray(latent), None if image is None else jnp.asarray(image), train=True,
            keys=None if keys is None else jnp.asarray(keys))
        assert expected_keys.shape == latent.shape
        np.testing.assert_allclose(np.asarray(actual_keys), expected_keys, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.asarray(actual_x), expected_x, rtol=RTOL, atol=ATOL)
        if expected_image is not None:
            np.testing.assert_allclose(np.asarray(actual_image), expected_image, rtol=RTOL, atol=ATOL)
        carried.append(expected_keys)
        x, image, keys = expected_x, expected_image, expected_keys
    # every stage moves the tokens; what a stage reads depends on what the stages before it did
    assert not np.allclose(carried[0], latent) and not np.allclose(carried[1], carried[0])
    x0 = np.random.default_rng(4).standard_normal((2, 8, 8, config.widths[0])).astype(np.float32)
    _, _, from_z = ref.generator_stage(x0, latent, None, params["stages"][0], config.stages[0], config)
    np.testing.assert_array_equal(from_z, carried[0])  # keys=None starts from Z


@pytest.mark.parametrize("overrides, resolution", [
    (["modulation=duplex"], 32),
    (["modulation=duplex", "multi_query=false", "norm=layer"], 32),
    (["modulation=duplex", "attention_stages=0"], 32),
    (["modulation=duplex", "resolution=64", "widths=32,16,16,16", "num_heads=4,2,2,2", "num_layers=1",
      "block_sizes=4,4,none,none", "attention=multi_axis"], 64),
])
def test_duplex_shapes_and_parameter_counts(overrides, resolution):
    config = get_config("tiny", overrides + ([] if "resolution=64" in overrides else
                                             ["latent_dim=16", "widths=32,16,16", "num_heads=4,2,2"]))
    model, params = random_pair(config, seed=7)
    z = jnp.asarray(np.random.default_rng(8).standard_normal((2, config.latent_dim)).astype(np.float32))
    for train in (True, False):
        images = model(z, train=train)
        assert images.shape == (2, resolution, resolution, 3) and images.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(images)))
    formula = parameter_counts(config)
    assert ref.count_parameters(params) == formula["total"]
    assert [ref.count_parameters(stage) for stage in params["stages"]] == formula["stages"]
    result = summary(config, flops=False)
    assert result["params"] == formula["total"]
    assert [stage["params"] for stage in result["stages"]] == formula["stages"]
    c0 = config.widths[0]
    for spec, stage in zip(config.stages, params["stages"]):
        d = spec.width // spec.num_heads
        assert stage["latent_update"]["attention"]["query"]["kernel"].shape == (c0, spec.num_heads, d)
        assert stage["latent_update"]["attention"]["out"]["kernel"].shape == (spec.num_heads, d, c0)
        assert stage["latent_update"]["image_norm"]["scale"].shape == (spec.width,)


def test_duplex_summary_at_imagenet_128_equals_chapter_6():
    "Counted from shapes, nothing allocated: 67.60M simplex, 72.06M duplex."
    for overrides, millions in (([], 67.60), (["modulation=duplex"], 72.06)):
        config = get_config("hit-l-128", overrides)
        result, formula = summary(config, flops=False), parameter_counts(config)
        assert result["params"] == formula["total"] and round(result["params"] / 1e6, 2) == millions
        assert [stage["params"] for stage in result["stages"]] == formula["stages"]


def test_duplex_training_step_reaches_every_update_parameter():
    "A jitted training-mode loss and its gradient; every leaf of the updates gets one but the key biases (softmax)."
    config = small_config("modulation=duplex")
    graphdef, params, stats = nnx.split(Generator(config, rngs=nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    z = jax.random.normal(jax.random.key(0), (2, config.latent_dim))

    @jax.jit
    def loss(params, stats, z):
        model = nnx.merge(graphdef, params, stats, copy=True)
        out = jnp.mean((model(z, train=True) - 0.5) ** 2)
        return out, nnx.state(model, nnx.BatchStat)

    (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params, stats, z)
    assert np.isfinite(float(value))
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]
    updates = [(jax.tree_util.keystr(path), g) for path, g in flat if "latent_update" in jax.tree_util.keystr(path)]
    assert len(updates) == 12 * config.num_stages
    for path, g in updates:
        assert np.all(np.isfinite(g)), path
        assert path.endswith("['key']['bias']") or np.any(g != 0), path
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats))]
    assert moved and all(moved)  # training mode wrote every batch norm's statistics


def test_duplex_tiled_inference_equals_the_oracle(monkeypatch):
    "The update reads the whole map before the per-pixel body, so tiles still give the oracle's numbers."
    from hitlib import generator as generator_module
    monkeypatch.setattr(generator_module, "INFERENCE_TILE_TOKENS", 96)
    config = small_config("modulation=duplex")
    model, params = random_pair(config, seed=5)
    z = np.random.default_rng(6).standard_normal((3, config.latent_dim)).astype(np.float32)
    expected = ref.generator(params, z, config, use_running_average=True)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(z), train=False)), expected, rtol=RTOL, atol=ATOL)


def test_simplex_is_untouched_by_the_duplex_option():
    """The default builds the trees it built before: no update anywhere, the same draws; a duplex NumPy tree is the
    simplex tree of the same generator plus one update per stage (drawn last)."""
    config = small_config()
    assert config.modulation == "simplex"
    model = Generator(config, rngs=nnx.Rngs(0))
    assert all(stage.latent_update is None for stage in model.stages)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(reference_params(model))[0]]
    assert not any("latent_update" in p for p in paths)
    simplex = ref.init_generator_params(config, np.random.default_rng(0), bias_std=0.05, random_norm=True)
    duplex = ref.init_generator_params(small_config("modulation=duplex"), np.random.default_rng(0), bias_std=0.05,
                                       random_norm=True)
    assert all(list(stage)[-1] == "latent_update" for stage in duplex["stages"])
    stripped = dict(duplex, stages=[{k: v for k, v in stage.items() if k != "latent_update"}
                                    for stage in duplex["stages"]])
    for a, b in zip(jax.tree.leaves(simplex), jax.tree.leaves(stripped), strict=True):
        np.testing.assert_array_equal(a, b)
    z = np.random.default_rng(1).standard_normal((2, config.latent_dim)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((2, 8, 8, config.widths[0])).astype(np.float32)
    latent = ref.latent_embedding(z, simplex["latent"], config)
    assert len(ref.generator_stage(x, latent, None, simplex["stages"][0], config.stages[0], config)) == 2

