"""Chapter 12b: the FID Inception-v3 in JAX/Flax NNX, and the proof that it is pytorch-fid's network.

The tests marked `pytorch_fid` build pytorch-fid's own `fid_inception_v3()` with random weights (its download replaced,
nothing fetched), convert its `state_dict` with `scripts/convert_inception_weights.py`, and compare features and logits.
They need PyTorch, torchvision and pytorch-fid; they FAIL (they are never skipped) when those are missing. Install
them with the `parity` extra (the README's setup does):

    .venv/bin/pip install -e ".[parity]"

or deselect them with `-m "not pytorch_fid"`.
"""
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from hitlib import inception
from hitlib.reference import metrics as ref

ROOT = Path(__file__).resolve().parents[1]
INSTALL = '.venv/bin/pip install -e ".[parity]"'


# parity needs true float32 products (conftest.py)
pytestmark = pytest.mark.usefixtures("full_float32_precision")


# ---------------------------------------------------------------- PyTorch side (imports, random network)

def _import_torchvision(torch):
    """Import torchvision beside the CPU build of torch.

    PyPI's torchvision 0.28.0 is built against torch's CUDA build: its compiled operators (`_C.so`) do not load beside
    the CPU build, and its import then fails in `_meta_registrations` with 'operator torchvision::nms does not exist'.
    Only torchvision's pure-Python model definitions are needed here, so we declare the two operator schemas that
    module registers fake kernels for (they are never called) and import again.
    """
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::nms does not exist" not in str(error):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision


@pytest.fixture(scope="module")
def torch_fid():
    "(torch, F, pytorch_fid.inception), or a failure that says what to install."
    try:
        import torch
        import torch.nn.functional as F
        _import_torchvision(torch)
        import pytorch_fid.inception as fid_inception
    except ImportError as error:
        pytest.fail(f"the pytorch_fid parity tests need PyTorch, torchvision and pytorch-fid ({error}). Install them: "
                    f"{INSTALL}  (or deselect with -m 'not pytorch_fid')")
    torch.set_num_threads(2)
    return torch, F, fid_inception


@pytest.fixture(scope="module")
def random_fid_network(torch_fid, tmp_path_factory):
    """pytorch-fid's network with random weights: (fid_inception_v3() module, InceptionV3 wrapper, .pth path).

    `fid_inception_v3()` is pytorch-fid's function: it builds torchvision's Inception3 (1008 classes, no auxiliary head),
    patches in FIDInceptionA/C/E_1/E_2 and loads weights from `load_state_dict_from_url`, which we replace by a function
    returning random weights. Batch-norm statistics are calibrated on random images (one pass in training mode with
    cumulative averages), then scales, biases and the output bias are randomised, so that every array matters.
    """
    torch, _, fid_inception = torch_fid
    torch.manual_seed(0)
    original_loader = fid_inception.load_state_dict_from_url
    try:
        template = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # random init
        fid_inception.load_state_dict_from_url = lambda *args, **kwargs: template.state_dict()
        network = fid_inception.fid_inception_v3()
        batch_norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in batch_norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one pass sets the running statistics to that batch's
        network.train()
        with torch.no_grad():
            network(2 * torch.rand(6, 3, 299, 299) - 1)
            for bn in batch_norms:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.2)
            network.fc.bias.normal_(0.0, 0.5)
        network.eval()
        state_dict = network.state_dict()
        fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        wrapper = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        fid_inception.load_state_dict_from_url = original_loader
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(state_dict, path)
    return network, wrapper, path


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_inception_weights",
                                                  ROOT / "scripts" / "convert_inception_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def converted_model(random_fid_network, tmp_path_factory):
    "The random pytorch-fid weights, converted by the script's `main` and loaded by `load_inception_weights`."
    _, _, pth = random_fid_network
    output = tmp_path_factory.mktemp("converted") / "fid_inception_v3.npz"
    assert _load_script().main([str(pth), "--output", str(output)]) == 0
    return inception.load_inception_weights(output)


def _images(seed, count, height, width):
    "uint8 test images: smooth random fields plus noise, so that both low and high frequencies reach the network."
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (count, 6, 6, 3))
    smooth = ref.resize_bilinear(coarse, height, width)
    return np.clip(smooth + rng.normal(0, 25, smooth.shape), 0, 255).round().astype(np.uint8)


def _to_torch(torch, images_uint8):
    "uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1], as torchvision's ToTensor gives pytorch-fid."
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0


def _relative_error(actual, expected):
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


# ---------------------------------------------------------------- parity with pytorch-fid

@pytest.mark.pytorch_fid
def test_features_and_logits_match_pytorch_fid(torch_fid, random_fid_network, converted_model):
    """Pool features and logits of pytorch-fid's network (random weights) vs ours after the script's conversion.

    One test, so that the PyTorch network is built once per test process (pytest-xdist runs modules' tests apart).
    """
    torch, F, _ = torch_fid
    network, wrapper, _ = random_fid_network
    # 1. the network at 299x299: 3 images in batches of 2 (the last batch is padded, nothing dropped)
    images = _images(0, 3, 299, 299)
    pool, logits = inception.inception_features(converted_model, images, batch_size=2)
    _, logits_unbiased = inception.inception_features(converted_model, images, batch_size=2, output_bias=False)
    with torch.no_grad():
        x = _to_torch(torch, images)
        expected_pool = wrapper(x)[0][:, :, 0, 0].numpy()  # pytorch-fid's FID features [N, 2048]
        expected_logits = network(2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
    expected_logits = expected_logits.numpy()
    expected_unbiased = expected_logits - network.fc.bias.detach().numpy()  # the Inception Score's logits
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    assert expected_pool.std() > 0.1 * np.abs(expected_pool).max()  # the random network's features are not degenerate
    errors = {"pool": _relative_error(pool, expected_pool), "logits": _relative_error(logits, expected_logits),
              "logits without bias": _relative_error(logits_unbiased, expected_unbiased)}
    # 2. the whole protocol with a resize inside pytorch-fid's wrapper (F.interpolate): up from 64, down from 400x352
    resized = {}
    for height, width in [(64, 64), (400, 352)]:
        small = _images(1, 2, height, width)
        resized[(height, width)] = inception.inception_features(converted_model, small, batch_size=2)[0]
        with torch.no_grad():
            expected = wrapper(_to_torch(torch, small))[0][:, :, 0, 0].numpy()
        errors[f"pool from {height}x{width}"] = _relative_error(resized[(height, width)], expected)
        np.testing.assert_allclose(resized[(height, width)], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    print("max |error| / max |value|: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    np.testing.assert_allclose(pool, expected_pool, rtol=1e-4, atol=1e-4 * np.abs(expected_pool).max())
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4 * np.abs(expected_logits).max())
    np.testing.assert_allclose(logits_unbiased, expected_unbiased, rtol=1e-4,
                               atol=1e-4 * np.abs(expected_unbiased).max())


@pytest.mark.pytorch_fid
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 60), st.integers(1, 60), st.integers(0, 2**16))
def test_resize_matches_f_interpolate(torch_fid, in_h, in_w, out_h, out_w, seed):
    torch, F, _ = torch_fid
    images = np.random.default_rng(seed).uniform(0, 1, (2, in_h, in_w, 3)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(out_h, out_w),
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ref.resize_bilinear(images, out_h, out_w), expected, rtol=0, atol=1e-5)
    # jax.image.resize(antialias=False) in [0, 1]: float32 source coordinates on both sides, but PyTorch scales by
    # in/out and JAX by 1/(out/in): seen up to 2e-6 over 300 random size pairs
    jitted = jax.jit(inception.resize_bilinear, static_argnums=(1, 2))
    np.testing.assert_allclose(np.asarray(jitted(jnp.asarray(images), out_h, out_w)), expected, rtol=0, atol=1e-5)


@pytest.mark.pytorch_fid
@pytest.mark.parametrize("size", [(64, 64), (128, 128), (256, 256), (512, 384), (1024, 1024)])
def test_preprocess_matches_pytorch_fid_protocol(torch_fid, size):
    torch, F, _ = torch_fid
    images = _images(2, 1, *size)
    x = _to_torch(torch, images)
    expected = (2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
    expected = expected.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(inception.preprocess_images(jnp.asarray(images))), expected, rtol=0,
                               atol=2e-6)  # [-1, 1]; both compute coordinates in float32 (seen: 3.6e-7)
    np.testing.assert_allclose(ref.preprocess_images(images), expected, rtol=0, atol=2e-4)  # float64 coordinates


@pytest.mark.pytorch_fid
def test_converter_refuses_a_torchvision_state_dict(torch_fid, tmp_path):
    torch, _, fid_inception = torch_fid
    torchvision = sys.modules["torchvision"]
    imagenet_layout = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "torchvision_inception.pth"
    torch.save(imagenet_layout.state_dict(), path)
    with pytest.raises(ValueError, match="AuxLogits"):
        _load_script().convert(path, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


# ---------------------------------------------------------------- the port on its own (no PyTorch)

def test_parameter_count_is_pytorch_fids():
    # torchvision's Inception-v3: 27,161,264 parameters with the auxiliary head and 1000 classes
    aux_head = 768 * 128 + 128 * 768 * 25 + 2 * (128 + 768) + 768 * 1000 + 1000
    abstract = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == 27_161_264 - aux_head + 8 * 2048 + 8
    shapes = inception.inception_weight_shapes()
    assert shapes["fc/kernel"] == (2048, 1008) and shapes["Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
    assert shapes["Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
    assert shapes["Mixed_7c/branch3x3dbl_3b/conv/kernel"] == (3, 1, 384, 384)


def _pool_loops(x, kind, stride, padding):
    b, h, w, c = x.shape
    out_h, out_w = (h + 2 * padding - 3) // stride + 1, (w + 2 * padding - 3) // stride + 1
    out = np.zeros((b, out_h, out_w, c))
    for i in range(out_h):
        for j in range(out_w):
            rows = [r for r in range(i * stride - padding, i * stride - padding + 3) if 0 <= r < h]
            cols = [q for q in range(j * stride - padding, j * stride - padding + 3) if 0 <= q < w]
            window = x[:, rows][:, :, cols].reshape(b, -1, c)
            out[:, i, j] = window.max(axis=1) if kind == "max" else window.mean(axis=1)
    return out


@pytest.mark.parametrize("height, width, seed", [(3, 3, 0), (8, 5, 1), (9, 9, 2)])
def test_pools_match_loops(height, width, seed):
    x = np.random.default_rng(seed).standard_normal((2, height, width, 3)).astype(np.float32)
    np.testing.assert_allclose(inception.avg_pool_same(jnp.asarray(x)), _pool_loops(x, "avg", 1, 1), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(inception.max_pool(jnp.asarray(x), 2), _pool_loops(x, "max", 2, 0))
    np.testing.assert_array_equal(inception.max_pool(jnp.asarray(x), 1, 1), _pool_loops(x, "max", 1, 1))


@pytest.mark.parametrize("in_size, out_size", [
    ((400, 352), (299, 299)),  # down, non-square
    ((1024, 768), (299, 299)),  # down by more than 2x: no antialiasing may creep in
    ((32, 32), (299, 299)),  # up
    ((64, 48), (17, 130)),  # down one axis, up the other
    ((5, 3), (5, 3)),  # identity
])
def test_jax_resize_matches_the_numpy_oracle(in_size, out_size):
    """`jax.image.resize(..., antialias=False)` (chapter 12b) against chapter 12a's float64 interpolation matrices.

    The oracle computes the source coordinate `(o + 1/2)·in/out − 1/2` in float64, JAX in float32: an error of about
    1e-7 × in pixels, times the jump between neighbours (at most 1 in [0, 1]); hence atol = 1e-7 · max(in) + 1e-6.
    """
    images = np.random.default_rng(sum(in_size + out_size)).uniform(0, 1, (2, *in_size, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(inception.resize_bilinear, static_argnums=(1, 2))(jnp.asarray(images), *out_size))
    assert ours.shape == (2, *out_size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.resize_bilinear(images, *out_size), rtol=0,
                               atol=1e-7 * max(in_size) + 1e-6)


@settings(max_examples=8)
@given(st.integers(8, 400), st.integers(8, 400), st.integers(0, 2**16))
def test_jax_preprocess_matches_numpy(height, width, seed):
    images = np.random.default_rng(seed).integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    ours = inception.preprocess_images(jnp.asarray(images))
    assert ours.shape == (1, 299, 299, 3) and ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), ref.preprocess_images(images), rtol=0, atol=2e-4)


def test_nnx_layers_compute_the_pure_functions():
    """`bn` (nnx.BatchNorm) and `fc` (nnx.Linear) hold the weights under the reference's leaf names and, called on
    their own, compute what `conv_bn_relu` and `inception_v3` compute with them."""
    model = inception.random_inception_v3(seed=4)
    params = model.as_params()
    layer = params["Mixed_5b"]["branch5x5_2"]  # 5x5, padding 2
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9, 9, 48)), jnp.float32)
    convolved = jax.lax.conv_general_dilated(x, layer["conv"]["kernel"], (1, 1), ((2, 2), (2, 2)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(jax.nn.relu(model.Mixed_5b.branch5x5_2.bn(convolved)),
                               inception.conv_bn_relu(x, layer, padding=(2, 2)), rtol=1e-5, atol=1e-5)
    assert isinstance(model.Mixed_5b.branch5x5_2.bn, nnx.BatchNorm) and isinstance(model.fc, nnx.Linear)
    assert model.Mixed_5b.branch5x5_2.bn.epsilon == inception.BN_EPSILON
    pool = jnp.asarray(np.random.default_rng(5).uniform(0, 2, (3, 2048)), jnp.float32)
    expected = np.asarray(pool, np.float64) @ np.asarray(params["fc"]["kernel"], np.float64) + params["fc"]["bias"]
    np.testing.assert_allclose(model.fc(pool), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_inception_features_keeps_every_image_and_matches_the_module():
    model = inception.random_inception_v3(seed=3)
    images = _images(4, 3, 299, 299)
    pool, logits = inception.inception_features(model, images, batch_size=2)  # batches of 2 and 1 (padded)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and pool.dtype == np.float32
    direct_pool, direct_logits = jax.jit(model.__call__)(inception.preprocess_images(jnp.asarray(images[1:3])))
    np.testing.assert_allclose(pool[1:3], direct_pool, rtol=1e-5, atol=1e-5 * float(jnp.abs(direct_pool).max()))
    np.testing.assert_allclose(logits[1:3], direct_logits, rtol=1e-5, atol=1e-5 * float(jnp.abs(direct_logits).max()))
    stats = inception.reference_statistics(pool)
    assert stats["num_samples"] == 3 and stats["mu"].dtype == np.float64
    np.testing.assert_allclose(stats["sigma"], np.cov(pool.astype(np.float64), rowvar=False), rtol=1e-12, atol=1e-15)


@pytest.fixture(scope="module")
def random_flat_weights():
    "A flat weights dict of a random model (read-only: tests copy it)."
    return inception._flatten(jax.tree.map(np.asarray, inception.random_inception_v3(seed=0).as_params()))


def _as_torch_layout(flat):
    torch_like = {}
    for name, value in flat.items():
        if name.endswith("conv/kernel"):
            value = value.transpose(3, 2, 0, 1)  # [k_h, k_w, C_in, C_out] -> [C_out, C_in, k_h, k_w]
        elif name == "fc/kernel":
            value = value.T
        torch_like[inception._torch_name(name)] = value
    return torch_like


def test_converter_and_loader_round_trip(tmp_path, random_flat_weights):
    flat = random_flat_weights
    torch_like = _as_torch_layout(flat)
    assert "Mixed_5b.branch5x5_2.conv.weight" in torch_like and torch_like["fc.weight"].shape == (1008, 2048)
    torch_like["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(7)  # a training counter, dropped
    converted = inception.torch_to_flax_weights(torch_like)
    assert set(converted) == set(flat)
    for name in flat:
        np.testing.assert_array_equal(converted[name], flat[name])
    path = inception.save_inception_weights(tmp_path / "w.npz", converted)
    with np.load(path, allow_pickle=False) as archive:  # plain arrays only
        assert sorted(archive.files) == sorted(flat)
    model = inception.load_inception_weights(path)
    for name, value in inception._flatten(jax.tree.map(np.asarray, model.as_params())).items():
        np.testing.assert_array_equal(value, flat[name])


@pytest.mark.parametrize("corrupt, message", [
    (lambda w: w.pop("Mixed_7b/branch3x3_2a/bn/mean"), "missing key 'Mixed_7b/branch3x3_2a/bn/mean'"),
    (lambda w: w.update({"extra/kernel": np.zeros(3)}), "unexpected key 'extra/kernel'"),
    (lambda w: w.update({"Mixed_6e/branch_pool/conv/kernel": np.zeros((1, 1, 768, 191))}),
     "key 'Mixed_6e/branch_pool/conv/kernel' has shape (1, 1, 768, 191), expected (1, 1, 768, 192)"),
])
def test_loader_names_the_bad_key(tmp_path, random_flat_weights, corrupt, message):
    flat = dict(random_flat_weights)
    corrupt(flat)
    path = tmp_path / "bad.npz"
    np.savez(path, **flat)
    with pytest.raises(ValueError) as error:
        inception.load_inception_weights(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_converter_names_the_bad_key(random_flat_weights):
    torch_like = _as_torch_layout(random_flat_weights)
    missing = {k: v for k, v in torch_like.items() if k != "Mixed_5d.branch_pool.bn.running_var"}
    with pytest.raises(ValueError, match="missing key 'Mixed_5d.branch_pool.bn.running_var'"):
        inception.torch_to_flax_weights(missing)
    with pytest.raises(ValueError, match="unexpected key 'AuxLogits.conv0.conv.weight'"):
        inception.torch_to_flax_weights(dict(torch_like, **{"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1))}))
    with pytest.raises(ValueError, match=r"key 'fc/kernel' has shape \(2048, 1000\)"):
        inception.torch_to_flax_weights(dict(torch_like, **{"fc.weight": np.zeros((1000, 2048))}))


def test_missing_weights_file_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as error:
        inception.load_inception_weights(tmp_path / "nothing.npz")
    assert "pt_inception-2015-12-05-6726825d.pth" in str(error.value)
    assert "scripts/convert_inception_weights.py" in str(error.value)
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "from_env.npz"))
    assert inception.resolve_weights_path() == tmp_path / "from_env.npz"
    assert _load_script().main([str(tmp_path / "missing.pth"), "--output", str(tmp_path / "o.npz")]) == 2


@pytest.mark.parametrize("call, message", [
    (lambda: inception.inception_features(None, np.zeros((2, 64, 64, 3), np.float32)), "must be uint8"),
    (lambda: inception.inception_features(None, np.zeros((2, 64, 64), np.uint8)), "rank 4 [N, H, W, 3]"),
    (lambda: inception.inception_features(None, np.zeros((2, 64, 64, 3), np.uint8), batch_size=0),
     "batch_size must be a positive integer, got batch_size=0"),
    (lambda: inception.inception_v3({}, jnp.zeros((1, 64, 64, 3))), "at least 75x75"),
    (lambda: inception.inception_v3({}, jnp.zeros((1, 299, 299, 1))), "3 channels"),
    (lambda: inception.preprocess_images(jnp.zeros((1, 8, 8, 4), jnp.uint8)), "3 channels"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)
