"""Chapter 12d: Keras' ImageNet Inception-v3 in Flax NNX (the HiT release's FID protocol), its preprocessing and the
converter from Keras' legacy HDF5 weights file.

The tests marked `keras` prove the port against Keras itself: Keras 3.15.1 on its JAX backend (no TensorFlow) builds
`keras.applications.InceptionV3(weights=None)`, its weights are replaced by seeded random ones (batch-norm moving
statistics included), Keras' own legacy saver writes them as `.h5`, and Keras' pool features and logits must equal
ours after `convert_keras_weights`. Keras runs in a child process, so that its global backend state and its layer-name
counters stay out of this session. They need keras and h5py; they FAIL (they are never skipped) when those are
missing. Install them with the `parity` extra:

    .venv/bin/pip install -e ".[parity]"

or deselect them with `-m "not keras"`.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hitlib import keras_inception as ki
from hitlib.inception import _flatten, resize_bilinear

INSTALL = '.venv/bin/pip install -e ".[parity]"'
NUM_IMAGES = 3

# parity needs true float32 products (conftest.py)
pytestmark = pytest.mark.usefixtures("full_float32_precision")


# ---------------------------------------------------------------- Keras side, in a child process

KERAS_SCRIPT = r"""
import json, sys
import numpy as np
import keras
from keras.src.legacy.saving import legacy_h5_format
import h5py

out = sys.argv[1]
model = keras.applications.InceptionV3(weights=None, classifier_activation=None)
rng = np.random.default_rng(11)
for layer in model.layers:
    values = []
    for weight in layer.weights:
        shape, leaf = tuple(weight.shape), weight.path.split("/")[-1]
        if leaf == "kernel" and len(shape) == 4:  # He-normal convolutions
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
        elif leaf == "kernel":  # predictions [2048, 1000]
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[0]), shape)
        elif leaf == "moving_variance":
            value = rng.uniform(0.8, 1.2, shape)
        else:  # beta, moving_mean, bias: non-zero, so that they are exercised
            value = rng.normal(0.0, 0.1, shape)
        values.append(value.astype(np.float32))
    if values:
        layer.set_weights(values)
with h5py.File(out + "/keras.h5", "w") as file:
    legacy_h5_format.save_weights_to_hdf5_group(file, model)
images = np.random.default_rng(12).uniform(-1, 1, (%d, 299, 299, 3)).astype(np.float32)
features = keras.Model(model.input, [model.get_layer("avg_pool").output, model.output])
pool, logits = features.predict(images, batch_size=%d, verbose=0)
pixels = np.random.default_rng(13).integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
scaled = keras.applications.inception_v3.preprocess_input(pixels.copy())
np.savez(out + "/keras_outputs.npz", images=images, pool=pool, logits=logits,
         pixels=pixels, scaled=np.asarray(scaled))
print(json.dumps({"count_params": int(model.count_params()), "keras": keras.__version__,
                  "backend": keras.backend.backend(),
                  "bn_epsilons": sorted({l.epsilon for l in model.layers if hasattr(l, "epsilon")}),
                  "bn_scales": sorted({l.scale for l in model.layers if hasattr(l, "epsilon")})}))
""" % (NUM_IMAGES, NUM_IMAGES)


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory):
    """Keras' random InceptionV3: (folder with keras.h5 and keras_outputs.npz, facts printed by the child)."""
    for package in ("keras", "h5py"):
        if importlib.util.find_spec(package) is None:
            pytest.fail(f"the keras parity tests need keras and h5py ({package} is missing). Install them: {INSTALL}  "
                        "(or deselect with -m 'not keras')")
    folder = tmp_path_factory.mktemp("keras")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", KERAS_SCRIPT, str(folder)], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.keras
def test_pool_features_and_logits_match_keras(keras_run, tmp_path):
    folder, facts = keras_run
    assert facts["keras"] == "3.15.1" and facts["backend"] == "jax"
    npz = ki.convert_keras_weights(folder / "keras.h5", tmp_path / "converted.npz")
    model = ki.load_keras_inception_weights(npz)
    with np.load(folder / "keras_outputs.npz") as outputs:
        images, pool, logits = outputs["images"], outputs["pool"], outputs["logits"]
    ours_pool, ours_logits = jax.jit(ki.keras_inception_v3)(model.as_params(), jnp.asarray(images))
    for name, ours, theirs in (("pool", ours_pool, pool), ("logits", ours_logits, logits)):
        ours = np.asarray(ours)
        error = np.abs(ours - theirs).max()
        print(f"{name}: max abs error {error:.2e}, relative to max |value| {error / np.abs(theirs).max():.2e}")
        # float32, 94 layers of convolutions summed in different orders
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    assert np.abs(pool).max() > 0.1 and np.std(logits) > 0.1  # the features are not degenerate


@pytest.mark.keras
def test_architecture_facts_match_keras(keras_run):
    _, facts = keras_run
    total = sum(int(np.prod(shape)) for shape in ki.keras_weight_shapes().values())
    assert facts["count_params"] == total == 23_851_784
    assert facts["bn_epsilons"] == [ki.KERAS_BN_EPSILON] and facts["bn_scales"] == [False]


@pytest.mark.keras
def test_keras_preprocess_input_is_our_uint8_scaling(keras_run):
    folder, _ = keras_run
    with np.load(folder / "keras_outputs.npz") as outputs:
        pixels, scaled = outputs["pixels"], outputs["scaled"]
    # hit_preprocess = resize_bilinear(x / 127.5 - 1): Keras' scaling, then the release's resize
    ours = ki.hit_preprocess(jnp.asarray(pixels.astype(np.uint8)))  # [2, 299, 299, 3]
    expected = resize_bilinear(jnp.asarray(scaled), 299, 299)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scaled, pixels / 127.5 - 1, rtol=1e-6, atol=1e-6)


@pytest.mark.keras
def test_the_converter_refuses_a_file_with_a_layer_missing(keras_run, tmp_path):
    import h5py

    folder, _ = keras_run
    copy = tmp_path / "missing.h5"
    copy.write_bytes((folder / "keras.h5").read_bytes())
    with h5py.File(copy, "r+") as file:
        del file["conv2d_40"]
        file.attrs["layer_names"] = [n for n in file.attrs["layer_names"] if n not in (b"conv2d_40", "conv2d_40")]
    with pytest.raises(ValueError, match="93 conv2d layers with weights, expected 94"):
        ki.convert_keras_weights(copy, tmp_path / "out.npz")


# ---------------------------------------------------------------- without Keras

def test_unit_shapes_and_names():
    shapes = ki.keras_weight_shapes()
    assert len(ki.keras_unit_shapes()) == 94 and len(shapes) == 378
    assert shapes["conv2d/kernel"] == (3, 3, 3, 32) and shapes["conv2d_93/kernel"] == (1, 1, 2048, 192)
    assert shapes["batch_normalization_93/moving_variance"] == (192,) and shapes["predictions/kernel"] == (2048, 1000)


def test_random_weights_round_trip_through_npz(tmp_path):
    flat = ki.random_keras_weights(seed=2)
    path = ki.save_keras_weights(tmp_path / "random.npz", flat)
    model = ki.load_keras_inception_weights(path)
    loaded = _flatten(model.as_params())
    assert loaded.keys() == flat.keys()
    for key, value in flat.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_loader_names_the_file_and_the_bad_key(tmp_path, monkeypatch):
    monkeypatch.setenv(ki.KERAS_WEIGHTS_ENV, str(tmp_path / "none.npz"))
    with pytest.raises(FileNotFoundError) as error:
        ki.load_keras_inception_weights()
    assert str(tmp_path / "none.npz") in str(error.value) and ki.KERAS_WEIGHTS_FILE_NAME in str(error.value)
    flat = ki.random_keras_weights(seed=2)
    del flat["batch_normalization_7/beta"]
    np.savez(tmp_path / "bad.npz", **flat)
    with pytest.raises(ValueError, match="bad.npz: missing key 'batch_normalization_7/beta'"):
        ki.load_keras_inception_weights(tmp_path / "bad.npz")
    flat = ki.random_keras_weights(seed=2)
    flat["predictions/bias"] = np.zeros(1008, np.float32)
    np.savez(tmp_path / "shape.npz", **flat)
    with pytest.raises(ValueError, match=r"key 'predictions/bias' has shape \(1008,\), expected \(1000,\)"):
        ki.load_keras_inception_weights(tmp_path / "shape.npz")


def test_converter_refuses_what_is_not_a_keras_file(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="junk.h5 is not a readable HDF5 file"):
        ki.read_keras_h5(tmp_path / "junk.h5")
    with pytest.raises(FileNotFoundError, match="no Keras weights file"):
        ki.read_keras_h5(tmp_path / "none.h5")


def test_preprocess_keeps_floats_and_scales_uint8():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(ki.hit_preprocess(jnp.asarray(pixels)),
                               ki.hit_preprocess(jnp.asarray(pixels / 127.5 - 1, jnp.float32)), atol=1e-6)
    flat = jnp.full((1, 20, 20, 3), 0.1234, jnp.float32)
    np.testing.assert_allclose(ki.hit_preprocess(flat), 0.1234, atol=1e-6)  # not rounded to a uint8 level
    with pytest.raises(ValueError, match="must be uint8 .* or float"):
        ki.hit_preprocess(jnp.zeros((1, 8, 8, 3), jnp.int32))


def test_network_checks_its_input():
    params = jax.tree.map(jnp.asarray, ki.keras_inception_from_weights(ki.random_keras_weights(0)).as_params())
    with pytest.raises(ValueError, match="at least 75x75"):
        ki.keras_inception_v3(params, jnp.zeros((1, 64, 64, 3)))


def test_hitlib_needs_no_h5py_until_a_file_is_converted(tmp_path):
    "hitlib imports without h5py and keras; the converter alone asks for h5py, naming the extra."
    script = ("import sys; sys.modules['h5py'] = None; sys.modules['keras'] = None\n"
              "import hitlib.keras_inception as ki, hitlib.evaluate, hitlib.cli\n"
              "try:\n    ki.read_keras_h5(sys.argv[1])\nexcept ImportError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.h5")], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "needs h5py: pip install 'hitlib[parity]'" in done.stdout
