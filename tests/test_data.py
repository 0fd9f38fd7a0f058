"""Chapter 11a: the embedded digits, image decoding, image folders, shards and the step-keyed Grain pipeline."""
import hashlib
import logging
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from hitlib import data

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------- helpers
def write_png16_rgb(path, pixels):
    "uint16 [H, W, 3] -> a 16-bit RGB PNG, written by hand (PIL cannot write one)."
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[i].astype(">u2").tobytes() for i in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                           + chunk(b"IEND", b""))


def grey3(grey):
    return np.repeat(grey[..., None], 3, axis=-1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def folder(tmp_path, rng):
    "Six readable images of different sizes and formats in two subfolders, plus two non-image files."
    root = tmp_path / "images"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "cats" / "wide.png")
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(root / "cats" / "tall_grey.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)).save(root / "cats" / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "dogs" / "big.jpg", quality=90)
    Image.fromarray((rng.integers(0, 256, (16, 18)).astype(np.uint16) * 257)).save(root / "dogs" / "deep.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "dogs" / "small.JPEG")
    (root / "LICENSE.txt").write_text("licence")
    (root / "dogs" / "._big.jpg").write_bytes(b"AppleDouble metadata")
    return root


def add_bad_files(root):
    (root / "cats" / "text.png").write_text("not an image")
    good = (root / "cats" / "wide.png").read_bytes()
    (root / "dogs" / "cut.png").write_bytes(good[:len(good) // 2])


# ------------------------------------------------------------------------------------------------- embedded digits
def test_mnist5k_loads_and_is_balanced():
    images, labels = data.load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and np.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0 and images.max() == 255


def test_mnist5k_file_checksum_matches_readme():
    digest = hashlib.sha256((ROOT / "datasets" / "mnist5k.npz").read_bytes()).hexdigest()
    readme = (ROOT / "datasets" / "README.md").read_text()
    assert digest in readme and data.MNIST5K_CONTENT_SHA256 in readme
    assert (ROOT / "datasets" / "mnist5k.npz").stat().st_size < 10 * 2**20


def test_mnist5k_damaged_or_missing_is_refused(tmp_path, monkeypatch):
    images, labels = data.load_mnist5k()
    images = images.copy()
    images[0, 0, 0] ^= 1  # one flipped bit
    np.savez_compressed(tmp_path / "mnist5k.npz", images=images, labels=labels)
    monkeypatch.setenv("HITLIB_DATASETS", str(tmp_path))
    with pytest.raises(ValueError, match="not the embedded MNIST subset"):
        data.load_mnist5k()
    monkeypatch.setenv("HITLIB_DATASETS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_embedded(32)


@given(st.integers(1, 3), st.integers(0, 2**16))
def test_embed_digits_matches_loops(count, seed):
    digits = np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(data.embed_digits(digits, 32), data.embed_digits_loops(digits))


@pytest.mark.parametrize("resolution", [8, 32, 48, 64])
def test_load_embedded_shapes_range_and_grey(resolution):
    images, labels = data.load_embedded(resolution, with_labels=True)
    assert images.shape == (5000, resolution, resolution, 3) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1 and labels.shape == (5000,)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    if resolution >= 32:
        assert (images[:, 0] == -1).all()  # the black margin survives enlarging


def test_load_embedded_at_32_is_the_padded_digit():
    digits, _ = data.load_mnist5k()
    images = data.load_embedded(32)
    np.testing.assert_array_equal(data.to_uint8(images[:, 2:30, 2:30, 1]), digits)
    assert (images[:, :2] == -1).all() and (images[:, 30:] == -1).all()


@pytest.mark.parametrize("bad", [0, -4, 3.5, True, "32", None])
def test_bad_resolution(bad):
    with pytest.raises(ValueError, match="resolution"):
        data.load_embedded(bad)


def test_to_float_and_back():
    pixels = np.arange(256, dtype=np.uint8)
    values = data.to_float(pixels)
    assert values[0] == -1 and values[-1] == 1 and values.dtype == np.float32
    np.testing.assert_array_equal(data.to_uint8(values), pixels)


# ---------------------------------------------------------------------------------------------------- resizing
def test_resize_square_is_a_pure_crop_at_the_short_side(rng):
    image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(data.resize_square(image, 12), image[:, 4:16])
    np.testing.assert_array_equal(data.resize_square(image.transpose(1, 0, 2), 12), image.transpose(1, 0, 2)[4:16])
    for size in (5, 12, 31):
        assert data.resize_square(image, size).shape == (size, size, 3)
    assert data.resize_square(image[..., 0], 7).shape == (7, 7)


def test_resize_square_keeps_a_constant_image_constant():
    image = np.full((30, 50, 3), 77, np.uint8)
    for size in (8, 30, 64):
        assert (data.resize_square(image, size) == 77).all()


def test_resize_square_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        data.resize_square(np.zeros((4, 4, 3), np.float32), 2)
    with pytest.raises(ValueError, match="size"):
        data.resize_square(np.zeros((4, 4, 3), np.uint8), 0)


def test_storage_size():
    assert data.storage_size(128, 0.875) == 146 and data.storage_size(256) == 256
    with pytest.raises(ValueError, match="crop_fraction"):
        data.storage_size(128, 1.5)


# ---------------------------------------------------------------------------------------------------- decoding
def test_decode_every_pixel_format(tmp_path, rng):
    rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    alpha = rng.integers(0, 256, (6, 9, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=-1)
    cases = {}
    Image.fromarray(rgb).save(tmp_path / "rgb.png"); cases["rgb.png"] = rgb
    Image.fromarray(grey).save(tmp_path / "grey.png"); cases["grey.png"] = grey3(grey)
    Image.fromarray(rgba).save(tmp_path / "rgba.png"); cases["rgba.png"] = data.composite(rgba)
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png"); cases["palette.png"] = grey3(grey)
    Image.fromarray(grey * 0 + np.where(grey > 127, 255, 0).astype(np.uint8)).convert("1").save(tmp_path / "bw.png")
    cases["bw.png"] = grey3(np.where(grey > 127, 255, 0).astype(np.uint8))
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha[..., 0])])
    la.save(tmp_path / "la.png")
    cases["la.png"] = data.composite(np.concatenate([grey3(grey), alpha], axis=-1))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png"); cases["grey16.png"] = grey3(grey)
    write_png16_rgb(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 256 + rng.integers(0, 256, rgb.shape))
    cases["rgb16.png"] = rgb
    for name, expected in cases.items():
        decoded = data.decode_image(tmp_path / name)
        assert decoded.dtype == np.uint8 and decoded.shape == (6, 9, 3), name
        np.testing.assert_array_equal(decoded, expected, err_msg=name)
    # over a white background instead
    np.testing.assert_array_equal(data.decode_image(tmp_path / "rgba.png", background=255), data.composite(rgba, 255))


def test_32_bit_integer_images_use_their_whole_range():
    "Mode I (32-bit signed): [0, 2**31 - 1] maps onto [0, 255] by the high 8 value bits; before, it was read as 16-bit."
    values = np.array([[0, 2**23 - 1, 2**23, 2**30, 2**31 - 1, -5]], np.int32)
    decoded = data.pil_to_rgb(Image.fromarray(values, mode="I"))
    assert decoded.shape == (1, 6, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[..., 0], [[0, 0, 1, 128, 255, 0]])
    sixteen = np.array([[0, 257, 65535]], np.uint16)
    np.testing.assert_array_equal(data.pil_to_rgb(Image.fromarray(sixteen))[..., 0], [[0, 1, 255]])  # I;16


def test_palette_with_transparent_colour_is_composited(tmp_path):
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([200, 100, 50] + [10, 20, 30] + [0, 0, 0] * 254)
    palette_image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    palette_image.info["transparency"] = 0
    palette_image.save(tmp_path / "p.png", transparency=0)
    decoded = data.decode_image(tmp_path / "p.png")
    expected = np.array([[[0, 0, 0], [10, 20, 30]] * 2, [[10, 20, 30]] * 2 + [[0, 0, 0]] * 2], np.uint8)
    np.testing.assert_array_equal(decoded, expected)


def test_jpeg_modes_and_exif_orientation(tmp_path):
    yy, xx = np.mgrid[0:16, 0:24]
    smooth = np.stack([xx * 10, yy * 15, 255 - xx * 5 - yy * 6], axis=-1).astype(np.uint8)  # [16, 24, 3]
    Image.fromarray(smooth).save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray(smooth[..., 0]).save(tmp_path / "grey.jpg", quality=95)
    Image.fromarray(smooth).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    for name, reference in (("rgb.jpg", smooth), ("grey.jpg", grey3(smooth[..., 0])), ("cmyk.jpg", smooth)):
        decoded = data.decode_image(tmp_path / name)
        assert decoded.shape == (16, 24, 3) and np.abs(decoded.astype(int) - reference).mean() < 4, name
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(smooth).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    rotated = data.decode_image(tmp_path / "rotated.jpg")
    assert rotated.shape == (24, 16, 3)
    assert np.abs(rotated.astype(int) - np.rot90(smooth, -1)).mean() < 4


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 255), st.integers(0, 2**16))
def test_composite_matches_loops(height, width, background, seed):
    rgba = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    np.testing.assert_array_equal(data.composite(rgba, background), data.composite_loops(rgba, background))


def test_composite_extremes():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], np.uint8)
    np.testing.assert_array_equal(data.composite(rgba, 200), [[[10, 20, 30], [200, 200, 200]]])


@pytest.mark.parametrize("kind", ["text", "cut_png", "cut_jpg", "empty", "header_only"])
def test_bad_files_raise_naming_the_file(tmp_path, rng, kind):
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "ok.png")
    Image.fromarray(image).save(tmp_path / "ok.jpg")
    payload = {"text": b"hello", "empty": b"",
               "cut_png": (tmp_path / "ok.png").read_bytes()[:500],
               "cut_jpg": (tmp_path / "ok.jpg").read_bytes()[:600],
               "header_only": (tmp_path / "ok.png").read_bytes()[:40]}[kind]
    path = tmp_path / f"bad_{kind}.png"
    path.write_bytes(payload)
    with pytest.raises(data.BadImageError, match=re.escape(str(path))):
        data.decode_image(path)
    assert issubclass(data.BadImageError, ValueError)


# ----------------------------------------------------------------------------------------------- image folders
def test_image_folder_lists_sorted_images_and_ignores_the_rest(folder):
    dataset = data.ImageFolder(folder, 12)
    names = [p.relative_to(folder).as_posix() for p in dataset.paths]
    assert names == ["cats/alpha.png", "cats/tall_grey.png", "cats/wide.png",
                     "dogs/big.jpg", "dogs/deep.png", "dogs/small.JPEG"]
    assert dataset.ignored == 2 and len(dataset) == 6
    for i in range(len(dataset)):
        image = dataset[i]
        assert image.shape == (12, 12, 3) and image.dtype == np.uint8
    with pytest.raises(IndexError):
        dataset[6]


def test_image_folder_elements_are_centre_squares(folder):
    source = data.decode_image(folder / "cats" / "wide.png")  # [20, 30, 3]
    np.testing.assert_array_equal(data.ImageFolder(folder, 20)[2], source[:, 5:25])
    np.testing.assert_array_equal(data.ImageFolder(folder, 10)[2], data.resize_square(source, 10))


def test_image_folder_labels(folder):
    dataset = data.ImageFolder(folder, 8, labels="subfolders")
    assert dataset.class_names == ["cats", "dogs"]
    assert [dataset[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert dataset[0]["image"].shape == (8, 8, 3)
    given_order = data.ImageFolder(folder, 8, labels="subfolders", class_names=["dogs", "cats", "birds"])
    assert [given_order[i]["label"] for i in range(6)] == [1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="not in class_names"):
        data.ImageFolder(folder, 8, labels="subfolders", class_names=["cats"])
    shutil.copy(folder / "cats" / "wide.png", folder / "loose.png")
    with pytest.raises(ValueError, match="loose.png"):
        data.ImageFolder(folder, 8, labels="subfolders")
    with pytest.raises(ValueError, match="labels"):
        data.ImageFolder(folder, 8, labels="folders")


def test_missing_empty_and_non_folder_are_refused(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    for wrong, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no image files"),
                           (tmp_path / "only_text", "holds no image files"),
                           (folder / "cats" / "wide.png", "is not a folder")):
        with pytest.raises(ValueError, match=re.escape(str(wrong)) + ".*" + message):
            data.ImageFolder(wrong, 16)
        with pytest.raises(ValueError, match=re.escape(str(wrong))):
            data.load_image_folder(wrong, 16)


def test_bad_files_raise_or_are_skipped_and_counted(folder, caplog):
    add_bad_files(folder)
    strict = data.ImageFolder(folder, 8)
    assert len(strict) == 8
    with pytest.raises(data.BadImageError, match=re.escape(str(folder / "cats" / "text.png"))):
        [strict[i] for i in range(len(strict))]
    with pytest.raises(data.BadImageError, match="text.png"):
        data.load_image_folder(folder, 8)
    with caplog.at_level(logging.WARNING, logger="hitlib.data"):
        lenient = data.ImageFolder(folder, 8, skip_bad=True)
    assert len(lenient) == 6
    assert sorted(Path(p).name for p, _ in lenient.skipped) == ["cut.png", "text.png"]
    assert "skipped 2 of 8" in caplog.text
    images = data.load_image_folder(folder, 8, skip_bad=True)
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.float32


def test_a_folder_of_only_bad_files_is_refused(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("no")
    with pytest.raises(ValueError, match="none of its 1 image files is readable"):
        data.ImageFolder(tmp_path / "bad", 8, skip_bad=True)


def test_load_image_folder_matches_the_dataset(folder):
    images = data.load_image_folder(folder, 12)
    dataset = data.ImageFolder(folder, 12)
    np.testing.assert_array_equal(images, np.stack([data.to_float(dataset[i]) for i in range(6)]))


# ------------------------------------------------------------------------------------------------------ shards
def test_shards_equal_the_folder(folder, tmp_path):
    manifest = data.prepare_image_folder(folder, tmp_path / "shards", 12, labels="subfolders", shard_size=4)
    assert manifest["count"] == 6 and [s["count"] for s in manifest["shards"]] == [4, 2]
    shards = data.ShardedArraySource(tmp_path / "shards")
    dataset = data.ImageFolder(folder, 12, labels="subfolders")
    assert len(shards) == 6 and shards.class_names == ["cats", "dogs"] and shards.size == 12
    for i in range(6):
        np.testing.assert_array_equal(shards[i]["image"], dataset[i]["image"])
        assert shards[i]["label"] == dataset[i]["label"]
    assert (tmp_path / "shards" / "files.txt").read_text().split() == [
        p.relative_to(folder).as_posix() for p in dataset.paths]
    with pytest.raises(IndexError):
        shards[6]
    with pytest.raises(ValueError, match="not empty"):
        data.prepare_image_folder(folder, tmp_path / "shards", 12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(shard_size=0), "shard_size must be a positive integer, got shard_size=0"),
    (dict(shard_size=2.0), "shard_size must be a positive integer, got shard_size=2.0"),
    (dict(workers=-1), "workers must be an integer >= 0, got workers=-1"),
    (dict(workers=True), "workers must be an integer >= 0, got workers=True"),
    (dict(resolution=0), "resolution must be a positive integer, got resolution=0"),
])
def test_prepare_checks_its_integers_before_writing(folder, tmp_path, kwargs, message):
    arguments = dict(resolution=12) | kwargs
    with pytest.raises(ValueError) as error:
        data.prepare_image_folder(folder, tmp_path / "shards", **arguments)
    assert str(error.value) == message and not (tmp_path / "shards").exists()


def test_shards_with_workers_and_skipped_files(folder, tmp_path):
    add_bad_files(folder)
    with pytest.raises(data.BadImageError, match="text.png"):
        data.prepare_image_folder(folder, tmp_path / "strict", 10)
    assert not (tmp_path / "strict").exists()  # the failed preparation took back what it wrote
    with pytest.raises(ValueError, match="no manifest.json"):
        data.ShardedArraySource(tmp_path / "strict")
    serial = data.prepare_image_folder(folder, tmp_path / "serial", 10, skip_bad=True, shard_size=3)
    parallel = data.prepare_image_folder(folder, tmp_path / "parallel", 10, skip_bad=True, shard_size=3, workers=2)
    assert serial["count"] == parallel["count"] == 6 and len(parallel["skipped"]) == 2
    a, b = data.ShardedArraySource(tmp_path / "serial"), data.ShardedArraySource(tmp_path / "parallel")
    for i in range(6):
        np.testing.assert_array_equal(a[i], b[i])


def test_crop_fraction_storage(folder, tmp_path):
    manifest = data.prepare_image_folder(folder, tmp_path / "in", 16, crop_fraction=0.875)
    assert manifest["size"] == 18 and manifest["resolution"] == 16
    source = data.ShardedArraySource(tmp_path / "in")
    assert source[0].shape == (18, 18, 3)
    batch = data.make_dataset(source, 2, seed=0)[0]
    assert batch.shape == (2, 16, 16, 3)


def test_read_label_file(tmp_path):
    (tmp_path / "a.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4 n01751748 5 6 7 8\n"
                                    "ILSVRC2012_val_00000002,n09193705 1 1 2 2\n")
    assert data.read_label_file(tmp_path / "a.csv") == {"ILSVRC2012_val_00000001": "n01751748",
                                                         "ILSVRC2012_val_00000002": "n09193705"}
    (tmp_path / "b.txt").write_text("x.JPEG n1\ny.JPEG n2\n\n")
    assert data.read_label_file(tmp_path / "b.txt") == {"x": "n1", "y": "n2"}
    (tmp_path / "c.txt").write_text("lonely\n")
    with pytest.raises(ValueError, match="line 1"):
        data.read_label_file(tmp_path / "c.txt")


def test_prepare_script_imagenet_train_and_val(tmp_path, rng):
    "datasets/prepare.py on a tiny ImageNet-like tree: class folders for train, a flat val folder with a CSV."
    train, val = tmp_path / "train", tmp_path / "val"
    for synset in ("n02", "n01"):
        (train / synset).mkdir(parents=True)
        for k in range(3):
            size = (20 + 4 * k, 28)
            Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(train / synset / f"{k}.JPEG")
    val.mkdir()
    rows = ["ImageId,PredictionString"]
    for k, synset in enumerate(["n02", "n01", "n02"]):
        Image.fromarray(rng.integers(0, 256, (30, 24, 3), dtype=np.uint8)).save(val / f"v{k}.JPEG")
        rows.append(f"v{k},{synset} 0 0 1 1")
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    script = str(ROOT / "datasets" / "prepare.py")
    common = ["--resolution", "16", "--workers", "0", "--quiet"]
    subprocess.run([sys.executable, script, "imagenet-train", str(train), str(tmp_path / "tr")] + common, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, script, "imagenet-val", str(val), str(tmp_path / "va"), "--classes-from",
                    str(tmp_path / "tr"), "--labels-csv", str(tmp_path / "val.csv")] + common, check=True,
                   capture_output=True)
    tr, va = data.ShardedArraySource(tmp_path / "tr"), data.ShardedArraySource(tmp_path / "va")
    assert tr.class_names == ["n01", "n02"] and va.class_names == ["n01", "n02"]
    assert tr.size == va.size == 18 and tr.resolution == 16  # round(16 / 0.875)
    assert [tr[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [va[i]["label"] for i in range(3)] == [1, 0, 1]
    evaluation = data.make_dataset(va, 3, train=False)[0]
    np.testing.assert_array_equal(evaluation["image"], data.to_float(np.stack([va[i]["image"][1:17, 1:17]
                                                                               for i in range(3)])))
    failed = subprocess.run([sys.executable, script, "imagenet-val", str(val), str(tmp_path / "v2")] + common,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "--classes-from" in failed.stderr


# ---------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def tagged():
    "120 small random images whose labels are their source index, to follow each image through the pipeline."
    images = np.random.default_rng(1).integers(0, 256, (120, 6, 6, 3), dtype=np.uint8)
    return images, [{"image": images[i], "label": i} for i in range(120)]


@given(seed=st.integers(0, 2**32 - 1), batch_size=st.sampled_from([1, 4, 7, 32]), start=st.integers(0, 60))
def test_resuming_at_any_step_gives_the_uninterrupted_batches(tagged, seed, batch_size, start):
    _, source = tagged
    run = data.make_dataset(source, batch_size, seed)
    uninterrupted = [run[s] for s in range(start + 3)]
    resumed = list(data.iterate_batches(data.make_dataset(source, batch_size, seed), start_step=start, num_steps=3))
    for a, b in zip(uninterrupted[start:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(data.batch_at(run, start)["image"], resumed[0]["image"])


def test_threaded_reading_gives_the_same_batches(tagged):
    _, source = tagged
    run = data.make_dataset(source, 8, 3)
    threaded = list(data.iterate_batches(run, start_step=10, num_steps=12, num_threads=3))
    assert len(threaded) == 12
    for step, batch in zip(range(10, 22), threaded):
        np.testing.assert_array_equal(batch["image"], run[step]["image"])


def test_each_epoch_is_a_permutation_and_epochs_differ(tagged):
    _, source = tagged
    run = data.make_dataset(source, 8, 5)
    stream = np.concatenate([run[s]["label"] for s in range(45)])  # 360 positions = 3 epochs
    epochs = stream.reshape(3, 120)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(120))
    assert not np.array_equal(epochs[0], epochs[1])
    other = np.concatenate([data.make_dataset(source, 8, 6)[s]["label"] for s in range(15)])
    assert not np.array_equal(other, epochs[0]) and not np.array_equal(other, epochs[1])  # seeds 5, 6 share nothing


@given(seed=st.integers(0, 1000), processes=st.sampled_from([1, 2, 4]), step=st.integers(0, 40))
def test_process_parts_concatenate_to_the_global_batch(tagged, seed, processes, step):
    _, source = tagged
    whole = data.make_dataset(source, 8, seed)[step]
    parts = [data.make_dataset(source, 8, seed, process_index=p, process_count=processes)[step]
             for p in range(processes)]
    assert all(part["image"].shape == (8 // processes, 6, 6, 3) for part in parts)
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), whole["label"])


def test_flips_are_mirrors_about_half_the_time(tagged):
    images, source = tagged
    run = data.make_dataset(source, 16, 11)
    flipped = total = 0
    for step in range(25):
        batch = run[step]
        for image, index in zip(batch["image"], batch["label"]):
            original = data.to_float(images[index])
            if np.array_equal(image, original):
                pass
            else:
                np.testing.assert_array_equal(image, original[:, ::-1])
                flipped += 1
            total += 1
    assert 0.4 < flipped / total < 0.6  # 400 fair coins: outside this range with probability < 1e-4
    no_flip = data.make_dataset(source, 16, 11, flip=False)[0]
    np.testing.assert_array_equal(no_flip["image"], data.to_float(images[no_flip["label"]]))


def test_failed_preparation_leaves_the_output_as_it_was(folder, tmp_path, monkeypatch):
    "An interrupt in the middle of writing the second shard removes both shards; an existing folder stays."
    real_save, saved = np.save, []

    def interrupted(path, array):
        saved.append(Path(path).name)
        if len(saved) == 3:  # images-00001.npy: cut short, then interrupted
            Path(path).write_bytes(b"cut")
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(np, "save", interrupted)
    (tmp_path / "existing").mkdir()
    for output in (tmp_path / "new" / "shards", tmp_path / "existing"):
        saved.clear()
        with pytest.raises(KeyboardInterrupt):
            data.prepare_image_folder(folder, output, 8, labels="subfolders", shard_size=2)
        assert saved == ["images-00000.npy", "labels-00000.npy", "images-00001.npy"]
        assert (output.exists(), list(output.iterdir()) if output.exists() else []) == (
            output.name == "existing", [])
    monkeypatch.setattr(np, "save", real_save)
    data.prepare_image_folder(folder, tmp_path / "existing", 8)  # an empty folder may be prepared into


def test_crop_and_flip_one_element():
    "The pipeline's crop + flip + scale of one real image (not chapter 10's DiffAugment `augment`)."
    image = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    centre = data.crop_and_flip({"image": image, "label": 3}, 0, 0, 4, train=False)
    np.testing.assert_array_equal(centre["image"], data.to_float(image[1:5, 1:5]))
    assert centre["label"] == 3 and centre["label"].dtype == np.int32
    draws = [data.crop_and_flip(image, index, 5, 4) for index in range(40)]
    windows = [data.to_float(image[t:t + 4, l:l + 4]) for t in range(3) for l in range(3)]
    mirrored = [np.any([np.array_equal(d, w[:, ::-1]) for w in windows]) for d in draws]
    assert all(np.any([np.array_equal(d, w) for w in windows]) or m for d, m in zip(draws, mirrored))
    assert 0 < sum(mirrored) < 40
    np.testing.assert_array_equal(data.crop_and_flip(image, 7, 5, 4), draws[7])  # (seed, index) fixes the draw
    with pytest.raises(TypeError):
        data.crop_and_flip(image, 0, 0, 4, False)  # train and flip are keywords
    assert not hasattr(data, "augment")  # one meaning per name: `augment` is DiffAugment's (hitlib.losses)


def test_random_crops_are_windows_of_the_image(rng):
    images = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    run = data.make_dataset(images, 5, seed=2, resolution=8, flip=False)
    offsets = set()
    for step in range(10):
        for crop in run[step]:
            matches = [(n, top, left) for n in range(10) for top in range(5) for left in range(5)
                       if np.array_equal(crop, data.to_float(images[n, top:top + 8, left:left + 8]))]
            assert matches
            offsets.add(matches[0][1:])
    assert len(offsets) > 10  # crops move over the 5 × 5 possible offsets


def test_evaluation_pass_is_in_order_with_centre_crops(rng):
    images = rng.integers(0, 256, (11, 10, 10, 3), dtype=np.uint8)
    evaluation = data.make_dataset(images, 4, resolution=8, train=False)
    assert len(evaluation) == 3 and evaluation[2].shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(np.concatenate([evaluation[s] for s in range(3)]),
                                  data.to_float(images[:, 1:9, 1:9]))
    parts = [data.make_dataset(images, 4, train=False, process_index=p, process_count=2) for p in range(2)]
    np.testing.assert_array_equal(parts[1][0], data.to_float(images[[1, 3]]))
    assert len(list(data.iterate_batches(evaluation))) == 3


def test_embedded_digits_through_the_pipeline():
    images = data.load_embedded(32)
    batch = data.make_dataset(images, 32, seed=0)[7]
    assert batch.shape == (32, 32, 32, 3) and batch.dtype == np.float32 and -1 <= batch.min() and batch.max() <= 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be a positive integer, got batch_size=0"),
    (dict(batch_size=4.0), "batch_size must be a positive integer, got batch_size=4.0"),
    (dict(process_count=0), "process_count must be a positive integer, got process_count=0"),
    (dict(process_index=-1), "process_index must be an integer >= 0, got process_index=-1"),
    (dict(batch_size=6, process_count=4), "not divisible"),
    (dict(process_index=2, process_count=2), "process_index"), (dict(seed=-1), "seed"),
    (dict(resolution=7), "smaller than resolution"), (dict(seed=2**32), "seed")])
def test_make_dataset_rejects_bad_arguments(kwargs, message):
    images = np.zeros((4, 6, 6, 3), np.uint8)
    arguments = dict(batch_size=4, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        data.make_dataset(images, **arguments)[0]


def test_save_npz_reproducibly(tmp_path, rng):
    arrays = {"b": rng.integers(0, 9, (3, 4), dtype=np.uint8).T, "a": np.arange(5.0), "c": np.float64(0.25)}
    data.save_npz_reproducibly(tmp_path / "x.npz", arrays)
    data.save_npz_reproducibly(tmp_path / "y.npz", dict(reversed(list(arrays.items()))))
    assert (tmp_path / "x.npz").read_bytes() == (tmp_path / "y.npz").read_bytes()
    with np.load(tmp_path / "x.npz") as loaded:
        np.testing.assert_array_equal(loaded["b"], arrays["b"])
        np.testing.assert_array_equal(loaded["a"], arrays["a"])
        assert loaded["c"].shape == () and loaded["c"] == 0.25  # 0-d arrays stay 0-d
