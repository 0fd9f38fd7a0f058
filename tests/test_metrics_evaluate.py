"""Chapter 12c: reference statistics, the statistics file, and evaluate_generator (batched, sharded, seeded).

The network is `random_inception_v3` (the real weights are not downloadable here); what is tested is the plumbing:
every image counted, the statistics equal to those of the features computed directly, the protocol (clip, round,
uint8), the metadata checks, and data-parallel sharding on two forced CPU devices (in a subprocess, since the device
count is fixed when JAX starts)."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hitlib import data, evaluate, inception, keras_inception
from hitlib.reference import metrics as ref
from hitlib.sampling import sample_latents
from helpers import run_python

LATENT_DIM, RESOLUTION, BATCH = 4, 8, 4
_PROJECTION = np.random.default_rng(5).standard_normal((LATENT_DIM, RESOLUTION * RESOLUTION * 3)).astype(np.float32)


def generate(z):
    "A test generator: z [B, 4] -> [B, 8, 8, 3], reaching beyond [-1, 1] so that clipping matters."
    return 1.2 * jnp.tanh(z @ jnp.asarray(_PROJECTION)).reshape(-1, RESOLUTION, RESOLUTION, 3)


def reference_images(count=5):
    return np.random.default_rng(6).integers(0, 256, (count, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return inception.random_inception_v3(seed=1)


@pytest.fixture(scope="module")
def stats(model):
    return evaluate.compute_reference_stats(reference_images(), model, BATCH, dataset="noise8", keep_features=True,
                                            progress=False)


# ---------------------------------------------------------------- pieces without the network

@settings(max_examples=15)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=8), st.integers(0, 2**16))
def test_feature_moments_match_np_cov_for_any_batching(sizes, seed):
    total = sum(sizes)
    if total < 2:
        sizes, total = sizes + [1], total + 1
    features = 3.0 + np.random.default_rng(seed).standard_normal((total, 6)).astype(np.float32)
    moments = evaluate.FeatureMoments()
    for part in np.split(features, np.cumsum(sizes)[:-1]):
        moments.update(part)
    mu, sigma = moments.statistics()
    assert moments.count == total
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
    expected = np.cov(features.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(sigma, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


@settings(max_examples=10)
@given(st.integers(2, 40), st.integers(1, 40), st.integers(0, 2**16))
def test_low_rank_frechet_distance_equals_the_two_eigh_route(num_samples, dim, seed):
    rng = np.random.default_rng(seed)
    features = 0.5 + rng.standard_normal((num_samples, dim)) @ rng.standard_normal((dim, dim))
    reference = ref.feature_statistics(rng.standard_normal((num_samples + dim + 2, dim)))
    expected = ref.frechet_distance(*ref.feature_statistics(features), *reference)
    ours = evaluate.frechet_distance_low_rank(features, *reference)
    scale = np.trace(reference[1]) + np.trace(np.cov(features, rowvar=False).reshape(dim, dim))
    # an exact identity; the eigh route takes √ of rounding-level eigenvalues, so it is off by up to about
    # √ε·scale (seen: 1.2e-7·scale for 33 samples of dimension 1)
    assert abs(ours - expected) <= 1e-6 * scale
    # of a singular covariance costs it about 1e-8 of the traces (chapter 12a)


def _fake_stats(**changes):
    rng = np.random.default_rng(8)
    stats = {"mu": rng.standard_normal(6), "sigma": np.eye(6), "num_samples": 10, "resolution": 32,
             "dataset": "mnist5k", "weights": "00112233aabbccdd", "features": rng.standard_normal((10, 6))}
    stats.update(changes)
    return stats


def test_stats_file_round_trip_is_plain_arrays(tmp_path):
    stats = _fake_stats()
    path = evaluate.save_stats(tmp_path / "sub" / "stats.npz", stats)
    with np.load(path, allow_pickle=False) as archive:  # no object arrays
        assert sorted(archive.files) == sorted([*stats, "protocol"])  # the protocol is always written
    loaded = evaluate.load_stats(path, expected_resolution=32, expected_dataset="mnist5k")
    assert loaded["num_samples"] == 10 and loaded["resolution"] == 32 and isinstance(loaded["resolution"], int)
    assert loaded["protocol"] == "standard"  # a dict without 'protocol' is the standard protocol's
    assert loaded["dataset"] == "mnist5k" and loaded["weights"] == "00112233aabbccdd"
    np.testing.assert_array_equal(loaded["mu"], stats["mu"])
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])
    np.testing.assert_array_equal(loaded["features"], stats["features"].astype(np.float32))


@pytest.mark.parametrize("expected, names", [
    ({"expected_resolution": 64}, ["resolution 32", "expected 64"]),
    ({"expected_dataset": "ffhq"}, ["dataset 'mnist5k'", "expected 'ffhq'"]),
    ({"expected_resolution": 256, "expected_dataset": "ffhq"}, ["resolution 32", "expected 256", "'ffhq'"]),
])
def test_load_stats_refuses_another_resolution_or_dataset(tmp_path, expected, names):
    path = evaluate.save_stats(tmp_path / "stats.npz", _fake_stats())
    with pytest.raises(ValueError) as error:
        evaluate.load_stats(path, **expected)
    assert str(path) in str(error.value) and all(name in str(error.value) for name in names)


def test_bad_stats_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="compute_reference_stats"):
        evaluate.load_stats(tmp_path / "nothing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")  # the weights' reader: named, with what to do
    with pytest.raises(ValueError, match=r"junk.npz is not a readable .npz .*compute_reference_stats"):
        evaluate.load_stats(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", mu=np.zeros(3), sigma=np.eye(3))  # e.g. pytorch-fid's own format
    with pytest.raises(ValueError, match="missing key 'num_samples'"):
        evaluate.load_stats(tmp_path / "partial.npz")
    with pytest.raises(ValueError, match=r"covariance must be \[D, D\]"):
        evaluate.save_stats(tmp_path / "x.npz", _fake_stats(sigma=np.eye(5)))
    with pytest.raises(ValueError, match=r"key 'features' has shape \(9, 6\)"):
        evaluate.save_stats(tmp_path / "x.npz", _fake_stats(features=np.zeros((9, 6))))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"metric": "precision"}, ValueError, "metric must be one of ('fid', 'is', 'kid')"),
    ({"metric": "fid"}, ValueError, "needs the real data's statistics"),
    ({"metric": "kid", "stats": {k: v for k, v in _fake_stats().items() if k != "features"}}, ValueError,
     "keep_features=True"),
    ({"metric": "is", "num_splits": 11}, ValueError, "num_splits must be an integer in [1, N=10]"),
    ({"metric": "fid", "stats": _fake_stats(), "latent_dim": 0}, ValueError, "latent_dim must be a positive integer, got latent_dim=0"),
])
def test_evaluate_generator_checks_its_arguments_first(kwargs, error, message):
    arguments = {"generate_fn": generate, "latent_dim": LATENT_DIM, "num_samples": 10, "model": "unused.npz"}
    arguments.update(kwargs)
    with pytest.raises(error) as raised:
        evaluate.evaluate_generator(**arguments)
    assert message in str(raised.value)


def test_missing_weights_file_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        evaluate.evaluate_generator(generate, LATENT_DIM, 10, "is", model=tmp_path / "none.npz")
    assert "scripts/convert_inception_weights.py" in str(error.value)
    assert inception.WEIGHTS_FILE_NAME in str(error.value)


def test_corrupt_weights_file_names_the_key(tmp_path, model):
    flat = inception._flatten(jax.tree.map(np.asarray, model.as_params()))
    del flat["Mixed_7c/branch_pool/bn/var"]
    np.savez(tmp_path / "bad.npz", **flat)
    with pytest.raises(ValueError, match="missing key 'Mixed_7c/branch_pool/bn/var'"):
        evaluate.evaluate_generator(generate, LATENT_DIM, 10, "is", model=tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        inception.load_inception_weights(tmp_path / "junk.npz")


# ---------------------------------------------------------------- with the (random) network

def test_reference_stats_keep_every_image_from_an_array_or_batches(model, stats):
    images = reference_images()
    pool, _ = inception.inception_features(model, images, batch_size=BATCH)  # chapter 12b's batched features
    assert stats["num_samples"] == 5 and stats["resolution"] == RESOLUTION and stats["dataset"] == "noise8"
    assert stats["weights"] == evaluate.weights_fingerprint(model)
    np.testing.assert_allclose(stats["features"], pool, rtol=1e-5, atol=1e-5 * np.abs(pool).max())
    mu, sigma = ref.feature_statistics(pool)
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-5, atol=1e-5 * np.abs(mu).max())
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-4, atol=1e-5 * np.abs(sigma).max())
    # the same images as an iterable of uneven batches (re-cut into batches of BATCH: no new compilation)
    from_batches = evaluate.compute_reference_stats(iter([images[:1], images[1:4], images[4:]]), model, BATCH,
                                                    dataset="noise8", progress=False)
    np.testing.assert_allclose(from_batches["mu"], stats["mu"], rtol=1e-6, atol=1e-6 * np.abs(mu).max())
    np.testing.assert_allclose(from_batches["sigma"], stats["sigma"], rtol=1e-5, atol=1e-6 * np.abs(sigma).max())
    assert from_batches["num_samples"] == 5 and "features" not in from_batches


@pytest.mark.parametrize("images, message", [
    ([reference_images(2), reference_images(2)[:, :4, :4]], "images (batch 1) has resolution 4, but the earlier"),
    ([reference_images(2).astype(np.float32)], "must be uint8"),
    ([reference_images(2)[:, :, :6]], "must be square"),
    ([reference_images(1)], "at least 2 images, got 1"),
])
def test_reference_stats_refuse_bad_batches(model, images, message):
    with pytest.raises(ValueError) as error:
        evaluate.compute_reference_stats(iter(images), model, BATCH, progress=False)
    assert message in str(error.value)


def _direct_features(model, num_samples, seed):
    "The same samples, generated in one go, quantised by chapter 12a's protocol (data.to_uint8), through 12b's features."
    images = np.asarray(generate(sample_latents(seed, np.arange(num_samples), LATENT_DIM)))
    return inception.inception_features(model, data.to_uint8(images), batch_size=BATCH, output_bias=False)


def test_evaluate_generator_equals_the_direct_computation(model, stats):
    results = evaluate.evaluate_generator(generate, LATENT_DIM, 6, ("fid", "is", "kid"), model, stats,
                                          batch_size=BATCH, seed=2, num_splits=2, kid_subsets=4, progress=False)
    pool, logits = _direct_features(model, 6, seed=2)
    expected_fid = evaluate.frechet_distance_low_rank(pool, stats["mu"], stats["sigma"])  # N <= D: see below
    np.testing.assert_allclose(results["fid"], expected_fid, rtol=1e-4)
    np.testing.assert_allclose((results["is_mean"], results["is_std"]), ref.inception_score(logits, 2), rtol=1e-4,
                               atol=1e-6)
    expected_kid = ref.kernel_inception_distance(stats["features"], pool, 4, 5, seed=2)
    np.testing.assert_allclose((results["kid_mean"], results["kid_std"]), expected_kid, rtol=1e-3,
                               atol=1e-4 * abs(expected_kid[0]))
    assert results["num_samples"] == 6 and results["resolution"] == RESOLUTION and results["seed"] == 2
    assert results["kid_subset_size"] == 5 and results["is_splits"] == 2 and results["dataset"] == "noise8"
    assert results["num_devices"] == jax.device_count() and results["batch_size"] % jax.device_count() == 0
    assert results["reference_samples"] == 5 and results["weights"] == stats["weights"]


def test_evaluate_generator_refuses_mismatches(model, stats):
    other = dict(stats, weights="ffffffffffffffff")
    with pytest.raises(ValueError, match="computed with Inception weights ffffffffffffffff, this model's are"):
        evaluate.evaluate_generator(generate, LATENT_DIM, 4, "fid", model, other, batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match="generator makes 8x8 images, the reference statistics are of 32x32"):
        evaluate.evaluate_generator(generate, LATENT_DIM, 4, "fid", model, dict(stats, resolution=32),
                                    batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match=r"must return images \[4, R, R, 3\], got shape \(4, 8, 8\)"):
        evaluate.evaluate_generator(lambda z: generate(z)[..., 0], LATENT_DIM, 4, "is", model, num_splits=1,
                                    batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match="must return float images"):
        evaluate.evaluate_generator(lambda z: data.to_uint8(generate(z)), LATENT_DIM, 4, "is", model,
                                    num_splits=1, batch_size=BATCH, progress=False)


_SHARDED = """
import json, sys
import jax
import numpy as np
sys.path.insert(0, {tests!r})
import test_metrics_evaluate as t
from hitlib import evaluate, inception
assert jax.device_count() == 2, jax.devices()
model = inception.random_inception_v3(seed=1)
stats = evaluate.load_stats({stats!r})
extractor = evaluate.FeatureExtractor(model, 3)  # rounded up to 4: 2 images per device
batch = np.zeros((4, 8, 8, 3), np.uint8)
sharding = extractor.put(batch).sharding
results = evaluate.evaluate_generator(t.generate, t.LATENT_DIM, 6, ("fid", "is"), model, stats, batch_size=3, seed=2,
                                      num_splits=2, progress=False)
from jax.sharding import PartitionSpec
print("RESULTS", json.dumps(dict(results, split_on_batch=sharding.spec == PartitionSpec("data"),
                                 shards=len(extractor.put(batch).addressable_shards))))
"""


def test_sharded_over_two_devices_equals_one_device(model, stats, tmp_path):
    path = evaluate.save_stats(tmp_path / "stats.npz", stats)
    single = evaluate.evaluate_generator(generate, LATENT_DIM, 6, ("fid", "is"), model, stats, batch_size=BATCH,
                                         seed=2, num_splits=2, progress=False)
    script = _SHARDED.format(tests=str(Path(__file__).parent), stats=str(path))
    done = run_python(["-c", script], devices=2)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = json.loads(done.stdout.split("RESULTS", 1)[1])
    assert sharded["num_devices"] == 2 and sharded["batch_size"] == 4 and sharded["shards"] == 2
    assert sharded["split_on_batch"]
    np.testing.assert_allclose(sharded["fid"], single["fid"], rtol=1e-5)
    np.testing.assert_allclose((sharded["is_mean"], sharded["is_std"]), (single["is_mean"], single["is_std"]),
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the HiT release's protocol (chapter 12d)

@pytest.fixture(scope="module")
def keras_model():
    return keras_inception.random_keras_inception_v3(seed=1)


@pytest.fixture(scope="module")
def hit_stats(keras_model):
    return evaluate.compute_reference_stats(reference_images(), keras_model, BATCH, dataset="noise8",
                                            keep_features=True, progress=False)


def test_hit_protocol_scores_the_unrounded_floats(keras_model, hit_stats):
    params = keras_model.as_params()
    # the real images: uint8, scaled to [-1, 1] by hit_preprocess, through Keras' network
    real_pool, _ = keras_inception.keras_inception_hit(params, jnp.asarray(reference_images()))
    assert hit_stats["protocol"] == "hit" and hit_stats["weights"] == evaluate.weights_fingerprint(keras_model)
    np.testing.assert_allclose(hit_stats["features"], real_pool, rtol=1e-5, atol=1e-5 * np.abs(real_pool).max())
    results = evaluate.evaluate_generator(generate, LATENT_DIM, 6, ("fid", "is"), keras_model, hit_stats,
                                          batch_size=BATCH, seed=2, num_splits=2, progress=False)
    # the generated floats clipped to [-1, 1] (the release's output clip), not rounded; Keras' logits
    # with their bias
    images = generate(sample_latents(2, np.arange(6), LATENT_DIM))
    pool, logits = (np.asarray(a) for a in keras_inception.keras_inception_hit(params, images))
    expected_fid = evaluate.frechet_distance_low_rank(pool, hit_stats["mu"], hit_stats["sigma"])
    np.testing.assert_allclose(results["fid"], expected_fid, rtol=1e-4)
    np.testing.assert_allclose((results["is_mean"], results["is_std"]), ref.inception_score(logits, 2), rtol=1e-4,
                               atol=1e-6)
    assert results["protocol"] == "hit" and results["weights"] == hit_stats["weights"]
    assert np.abs(np.asarray(images)).max() > 1  # so the clip below is exercised
    clipped_pool, _ = keras_inception.keras_inception_hit(params, jnp.clip(images, -1, 1))
    np.testing.assert_array_equal(np.asarray(clipped_pool), pool)
    # rounding to uint8 (the standard protocol's pixels) would have given other features: a
    # rounding moves a pixel by up to 1/255 of the range, and these features by about 3e-4 of their
    # largest value here (1.3e-3 / 3.6)
    rounded_pool, _ = keras_inception.keras_inception_hit(params, data.to_uint8(images))
    assert np.abs(np.asarray(rounded_pool) - pool).max() > 1e-4 * np.abs(pool).max()


def test_protocols_refuse_each_others_statistics(model, stats, keras_model, hit_stats, tmp_path):
    arguments = dict(batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match="'hit' FID protocol, but this evaluation uses 'standard'"):
        evaluate.evaluate_generator(generate, LATENT_DIM, 4, "fid", model, hit_stats, **arguments)
    with pytest.raises(ValueError, match="'standard' FID protocol, but this evaluation uses 'hit'.*not comparable"):
        evaluate.evaluate_generator(generate, LATENT_DIM, 4, "fid", keras_model, stats, **arguments)
    with pytest.raises(ValueError, match="protocol 'hit' was asked for, but the model is the 'standard'"):
        evaluate.evaluate_generator(generate, LATENT_DIM, 4, "fid", model, stats, protocol="hit", **arguments)
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate.evaluate_generator(generate, LATENT_DIM, 4, "fid", stats=stats, protocol="keras", **arguments)
    with pytest.raises(TypeError, match="model must be an InceptionV3"):
        evaluate.FeatureExtractor(object(), BATCH)
    # the file keeps the protocol; a file from before chapter 12d (no 'protocol') is a standard one
    path = evaluate.save_stats(tmp_path / "hit.npz", hit_stats)
    assert evaluate.load_stats(path, expected_protocol="hit")["protocol"] == "hit"
    with pytest.raises(ValueError, match=r"hit.npz holds reference statistics of the 'hit' FID protocol"):
        evaluate.load_stats(path, expected_protocol="standard")
    old = {k: v for k, v in _fake_stats().items()}
    np.savez(tmp_path / "old.npz", **old)
    assert evaluate.load_stats(tmp_path / "old.npz", expected_protocol="standard")["protocol"] == "standard"
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate.save_stats(tmp_path / "x.npz", _fake_stats(protocol="keras"))


def test_missing_keras_weights_file_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        evaluate.evaluate_generator(generate, LATENT_DIM, 10, "is", model=tmp_path / "none.npz", protocol="hit")
    assert str(tmp_path / "none.npz") in str(error.value)
    assert keras_inception.KERAS_WEIGHTS_FILE_NAME in str(error.value)
