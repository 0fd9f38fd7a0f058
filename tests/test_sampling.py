"""Chapter 11f: latents keyed by sample index, inference-mode images that do not
depend on the batching, and PNG grids written whole."""
import numpy as np
from flax import nnx
from PIL import Image

from hitlib.config import get_config
from hitlib.generator import Generator
from hitlib.sampling import generate, save_image_grid, sample_latents


def test_latents_do_not_depend_on_the_batching():
    whole = np.asarray(sample_latents(3, np.arange(11), 5))
    parts = np.concatenate([sample_latents(3, np.arange(0, 4), 5),
                            sample_latents(3, np.arange(4, 11), 5)])
    np.testing.assert_array_equal(whole, parts)
    assert whole.shape == (11, 5) and whole.dtype == np.float32
    assert abs(whole.mean()) < 1 and 0.5 < whole.std() < 1.5
    assert not np.array_equal(whole, sample_latents(4, np.arange(11), 5))
    np.testing.assert_array_equal(whole[7], sample_latents(3, [7], 5)[0])  # any index alone


def test_generate_is_the_same_in_any_batches_and_clipped(tmp_path):
    config = get_config("tiny", ["widths=32,16,8", "latent_dim=16"])
    model = Generator(config, rngs=nnx.Rngs(0))
    z = sample_latents(0, np.arange(7), config.latent_dim)
    images = generate(model, z)
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.float32
    assert np.abs(images).max() <= 1.0
    # batches of 3, 3 and 1: other matmul shapes, the same images up to rounding
    np.testing.assert_allclose(generate(model, z, batch_size=3), images, atol=1e-5)
    path = save_image_grid(images, tmp_path / "deep" / "grid.png", columns=4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no .tmp left
    grid = np.asarray(Image.open(path))
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    assert grid.shape[1] > 4 * 32 and grid.shape[0] > 2 * 32  # 4 columns, 2 rows, gaps
