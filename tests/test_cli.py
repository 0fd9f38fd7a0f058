"""Chapter 13: the `hitlib` command — summary, prepare, train (recipes, dry run, shards, resume), sample, interpolate,
eval (FDD, FID, IS, KID).

FID, IS and KID run on a file of random Inception weights made here (`random_inception_v3`): no download; what is
tested is the command's plumbing, the library's numbers are tested in test_metrics_evaluate.py."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jax

from hitlib import (checkpoints, cli, config, data, evaluate, generator, inception, keras_inception,
                    recipes, sampling, train)

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["batch_size=4", "d_max_channels=8", "widths=32,16,8", "latent_dim=16", "checkpoint_every=2", "log_every=2",
         "sample_every=100", "num_samples=4"]


def test_summary_table_and_json(capsys):
    assert cli.main(["summary", "tiny"]) == 0
    table = capsys.readouterr().out
    expected = generator.summary(config.get_config("tiny"), flops=True)
    assert f"parameters {expected['params']:,}" in table and len(table.splitlines()) == 6 + len(expected["stages"])
    assert cli.main(["summary", "tiny", "--json", "latent_dim=32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(json.dumps(generator.summary(config.get_config("tiny", ["latent_dim=32"]))))


def test_usage_errors_are_reported_not_raised(capsys, tmp_path):
    assert cli.main(["summary", "tinny"]) == 2
    assert "did you mean 'tiny'" in capsys.readouterr().err
    assert cli.main(["train", "--workdir", str(tmp_path / "run"), "batch_size=0"]) == 2
    assert "batch_size must be a positive integer, got batch_size=0" in capsys.readouterr().err
    assert cli.main(["sample", "--workdir", str(tmp_path / "nothing")]) == 2
    assert "holds no training run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--workdir", str(tmp_path), "--metric", "accuracy"])


def test_train_resume_sample_eval(capsys, tmp_path):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(workdir), "--steps", "2", "--quiet", *SMALL]) == 0
    assert "to step 2" in capsys.readouterr().out
    saved = checkpoints.load_config(workdir)
    assert (saved.steps, saved.batch_size, saved.generator_overrides) == (2, 4, ("widths=32,16,8", "latent_dim=16"))
    assert cli.main(["train", "--workdir", str(workdir), "--steps", "4", "--quiet", *SMALL]) == 0  # resumes
    assert "to step 4" in capsys.readouterr().out
    assert [record["step"] for record in train.read_metrics(workdir)] == [2, 4]
    assert cli.main(["train", "--workdir", str(workdir), "--steps", "4", "--quiet", *SMALL, "g_lr=1e-3"]) == 2
    assert "g_lr: saved 0.0002, requested 0.001" in capsys.readouterr().err

    assert cli.main(["sample", "--workdir", str(workdir), "--num", "6", "--columns", "3"]) == 0
    capsys.readouterr()
    stem = workdir / "samples" / "sample_step0000004_seed0"
    with np.load(stem.with_suffix(".npz")) as archive:
        assert archive["images"].shape == (6, 32, 32, 3) and archive["images"].dtype == np.uint8
        assert archive["z"].shape == (6, 16)
    assert Image.open(stem.with_suffix(".png")).size == (3 * 33 - 1, 2 * 33 - 1)

    assert cli.main(["eval", "--workdir", str(workdir), "--num", "200"]) == 0  # --num: --num-samples
    assert "fdd" in capsys.readouterr().out
    result = json.loads((workdir / "eval" / "fdd_step0000004.json").read_text())
    assert result["step"] == 4 and result["num_samples"] == 200 and result["fdd"] > 0
    assert result["checkpoint"] == "checkpoints/4"


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "hitlib", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)  # generous: only a hung process reaches it
    assert result.returncode == 0 and all(word in result.stdout
                                          for word in ("summary", "prepare", "train", "sample", "interpolate", "eval"))



def test_a_second_run_finds_its_compiled_step_in_the_cache(tmp_path):
    # `hitlib train` turns on JAX's persistent compilation cache: the first run writes the
    # compiled programs, a second run of the same configuration writes nothing new (hits).
    # JAX caches only programs that took over a second to compile, and on a busy machine a
    # small one crosses that line in one run and not the other: cache every program.
    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def train_once(name):
        subprocess.run([sys.executable, "-m", "hitlib", "train", "--workdir", str(tmp_path / name), "--steps", "1",
                        "--quiet", *SMALL], cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
        return sorted(path.name for path in cache.iterdir())

    first = train_once("first")
    assert any(name.startswith("jit_step_fn") for name in first), first
    assert train_once("second") == first


# ---------------------------------------------------------------------------------- interpolate, FID / IS / KID
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    "A run of the SMALL configuration trained for 2 steps."
    workdir = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["train", "--workdir", str(workdir), "--steps", "2", "--quiet", *SMALL]) == 0
    return workdir


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    "A converted-weights file holding random Inception weights (chapter 12b's format)."
    model = inception.random_inception_v3(seed=3)
    flat = inception._flatten(jax.tree.map(np.asarray, model.as_params()))
    return inception.save_inception_weights(tmp_path_factory.mktemp("weights") / "random.npz", flat)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    "A folder of 12 real 32×32 digits as PNG files."
    folder = tmp_path_factory.mktemp("data") / "digits"
    folder.mkdir()
    for index, image in enumerate(data.to_uint8(data.load_embedded(32)[:12])):
        Image.fromarray(image).save(folder / f"{index:02d}.png")
    return folder


# A 64 MB request: mapped on its own (one more mmapped block) under glibc's defaults,
# served from the heap once tune_allocator has run; left alone when MALLOC_* is set.
MMAP_PROBE = """
import ctypes, sys
from hitlib.cli import tune_allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
tuned = tune_allocator() if sys.argv[1] == "tune" else None
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
print(tuned, libc.mallinfo2().hblks - before)
libc.free(ctypes.c_void_p(block))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tune_allocator sets glibc's malloc")
@pytest.mark.parametrize("setting, user_env, expected", [
    ("tune", {}, "True 0"), ("leave", {}, "None 1"), ("tune", {"MALLOC_ARENA_MAX": "2"}, "False 1")])
def test_tune_allocator_keeps_large_buffers_off_mmap(setting, user_env, expected):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", MMAP_PROBE, setting], env=dict(env, **user_env),
                         capture_output=True, text=True, check=True, timeout=600).stdout
    assert out.split() == expected.split()


def test_interpolate_writes_a_strip_and_the_latents(capsys, run_dir, tmp_path):
    stem = tmp_path / "morph"
    assert cli.main(["interpolate", "--workdir", str(run_dir), "--num", "5", "--pairs", "3", "--seed", "2",
                     "--output", str(stem)]) == 0
    assert "3 morphs of 5 steps" in capsys.readouterr().out
    assert Image.open(stem.with_suffix(".png")).size == (5 * 33 - 1, 3 * 33 - 1)  # one row per pair
    with np.load(stem.with_suffix(".npz")) as archive:
        images, z, t = archive["images"], archive["z"], archive["t"]
    assert images.shape == (3, 5, 32, 32, 3) and images.dtype == np.uint8 and z.shape == (3, 5, 16)
    np.testing.assert_array_equal(t, [0, 0.25, 0.5, 0.75, 1])
    ends = np.asarray(sampling.sample_latents(2, np.arange(6), 16))  # --seed 2, latent_dim 16
    np.testing.assert_array_equal(z[:, 0], ends[:3])  # exact: t = 0 and t = 1 are the latents themselves
    np.testing.assert_array_equal(z[:, -1], ends[3:])
    np.testing.assert_allclose(z[:, 2], (ends[:3] + ends[3:]) / 2, rtol=1e-6, atol=1e-7)  # atol: values near 0
    run = train.load_run(run_dir)
    expected = data.to_uint8(sampling.generate(run.generator, z.reshape(15, 16))).reshape(images.shape)
    np.testing.assert_array_equal(images, expected)
    assert cli.main(["interpolate", "--workdir", str(run_dir), "--num", "1"]) == 2
    assert "--num must be at least 2" in capsys.readouterr().err


def test_stats_then_fid_is_kid(capsys, run_dir, weights, digits, tmp_path):
    options = ["--weights", str(weights), "--batch-size", "8", "--quiet"]
    stats_file = tmp_path / "digits.npz"
    make_stats = ["stats", str(stats_file), "--data", str(digits), "--resolution", "32", "--features", *options]
    assert cli.main(make_stats) == 0
    assert "reference statistics of 12 images of 'digits' at 32×32" in capsys.readouterr().out
    # an existing file is kept, before the weights are loaded or an image read; --force replaces it
    made = evaluate.load_stats(stats_file)
    stats_file.write_bytes(b"the user's own file")
    assert cli.main(make_stats) == 2
    assert "exists: pass --force" in capsys.readouterr().err
    assert stats_file.read_bytes() == b"the user's own file"
    assert cli.main([*make_stats, "--force"]) == 0
    np.testing.assert_array_equal(evaluate.load_stats(stats_file)["mu"], made["mu"])
    stats = evaluate.load_stats(stats_file, expected_resolution=32, expected_dataset="digits")
    assert stats["num_samples"] == 12 and stats["features"].shape == (12, 2048)  # 12 = 8 + 4: no image dropped
    fingerprint = evaluate.weights_fingerprint(inception.load_inception_weights(weights))
    assert stats["weights"] == fingerprint

    for metric in ("fid", "is", "kid"):
        assert cli.main(["eval", "--workdir", str(run_dir), "--metric", metric, "--num-samples", "10", "--stats",
                         str(stats_file), "--dataset", "digits", *options]) == 0
        assert "step 2, 10 samples of the EMA generator" in capsys.readouterr().out
    results = {metric: json.loads((run_dir / "eval" / f"{metric}_step0000002.json").read_text())
               for metric in ("fid", "is", "kid")}
    for metric, result in results.items():
        assert (result["metric"], result["step"], result["checkpoint"]) == (metric, 2, "checkpoints/2")
        assert (result["num_samples"], result["resolution"], result["weights"]) == (10, 32, fingerprint)
        assert result["batch_size"] % result["num_devices"] == 0
    assert results["fid"]["fid"] > 0 and results["fid"]["reference_samples"] == 12
    assert abs(results["is"]["is_mean"] - 1.0) < 1e-5  # 10 splits of one sample: p(y|x) = p(y), IS = 1 exactly
    assert np.isfinite(results["kid"]["kid_mean"]) and results["kid"]["kid_subset_size"] == 10


def fake_stats(path, resolution=32, dataset="mnist5k", features=False):
    stats = {"mu": np.zeros(4), "sigma": np.eye(4), "num_samples": 6, "resolution": resolution, "dataset": dataset,
             "weights": "0" * 16}
    if features:
        stats["features"] = np.zeros((6, 4), np.float32)
    return evaluate.save_stats(path, stats)


def test_eval_refusals(capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "no_weights.npz"))
    base = ["eval", "--workdir", str(run_dir), "--num-samples", "10"]
    # no weights file: how to obtain and convert it, for evaluating and for computing statistics
    assert cli.main([*base, "--metric", "is"]) == 2
    err = capsys.readouterr().err
    assert "no Inception weights at" in err and "pt_inception-2015-12-05" in err and "convert_inception_weights" in err
    assert cli.main(["stats", str(tmp_path / "out.npz")]) == 2
    assert "no Inception weights at" in capsys.readouterr().err and not (tmp_path / "out.npz").exists()
    # statistics of another resolution or dataset: refused with both named (before the weights are needed)
    assert cli.main([*base, "--metric", "fid", "--stats", str(fake_stats(tmp_path / "r16.npz", resolution=16))]) == 2
    assert "resolution 16, not the expected 32" in capsys.readouterr().err
    assert cli.main([*base, "--metric", "fid", "--stats", str(fake_stats(tmp_path / "ffhq.npz", dataset="ffhq"))]) == 2
    assert "dataset 'ffhq', not the expected 'mnist5k'" in capsys.readouterr().err
    # FID without statistics, KID without features, nothing to evaluate
    assert cli.main([*base, "--metric", "fid"]) == 2
    assert "needs the real data's reference statistics" in capsys.readouterr().err
    assert cli.main([*base, "--metric", "kid", "--stats", str(fake_stats(tmp_path / "plain.npz"))]) == 2
    assert "holds no features" in capsys.readouterr().err
    assert cli.main(["eval", "--metric", "fid"]) == 2
    assert "--workdir is needed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*base[:-1], "0"])  # --num-samples 0


def test_default_sample_counts_and_dataset_names():
    assert cli.default_num_samples("fid", recipes.train_config("ffhq-256")) == 50_000
    assert cli.default_num_samples("kid", recipes.train_config("imagenet-128")) == 50_000
    assert cli.default_num_samples("is", recipes.train_config("celebahq-256")) == 30_000
    assert cli.default_num_samples("fid", recipes.train_config("celebahq-1024")) == 30_000
    assert cli.default_num_samples("fdd", recipes.train_config("tiny")) == 5000
    assert cli.dataset_name(None) == "mnist5k" and cli.dataset_name("/data/celeba_hq/") == "celeba_hq"


# ------------------------------------------------------------------------------------- prepare, recipes, shards
def write_images(folder: Path, sizes, seed: int = 0) -> list:
    "Random RGB PNGs of the given (height, width) sizes in `folder`; their paths."
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, size in enumerate(sizes):
        paths.append(folder / f"{index:03d}.png")
        Image.fromarray(rng.integers(0, 256, tuple(size) + (3,), dtype=np.uint8)).save(paths[-1])
    return paths


def test_prepare_then_train_on_the_shards(capsys, tmp_path):
    "An image folder through `hitlib prepare` and `hitlib train --data`: the route a newcomer takes."
    write_images(tmp_path / "photos", [(40, 48)] * 6 + [(32, 32)] * 2)
    shards = tmp_path / "photos-32"
    assert cli.main(["prepare", "folder", str(tmp_path / "photos"), str(shards), "--resolution", "32",
                     "--workers", "0", "--shard-size", "3", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.split(": ", 1)[1])
    assert summary["count"] == 8 and summary["shards"] == 3 and summary["size"] == 32
    workdir = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(workdir), "--data", str(shards), "--steps", "2", "--quiet",
                     *SMALL]) == 0
    assert checkpoints.load_config(workdir).data == str(shards) and checkpoints.CheckpointStore(workdir, read_only=True).steps() == [2]
    images = data.to_uint8(data.make_dataset(data.ShardedArraySource(shards), 4, flip=False)[0])
    assert images.shape == (4, 32, 32, 3)
    assert cli.main(["train", "--workdir", str(tmp_path / "raw"), "--data", str(tmp_path / "photos"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "hitlib prepare folder" in error and "--resolution 32" in error
    assert not (tmp_path / "raw").exists()
    (shards / "images-00001.npy").write_bytes(b"cut")  # a damaged shard is reported before any step, by name
    assert cli.main(["train", "--workdir", str(tmp_path / "cut"), "--data", str(shards), "--quiet", *SMALL]) == 2
    assert "images-00001.npy" in capsys.readouterr().err and not (tmp_path / "cut").exists()


def exit_status(argv) -> int:
    "The exit status of `hitlib ARGV`: what `main` returns, or the status of argparse's SystemExit."
    try:
        return cli.main(argv)
    except SystemExit as exit:
        return exit.code


def test_prepare_refuses_bad_input_in_one_line(capsys, tmp_path, caplog):
    source = tmp_path / "photos"
    write_images(source, [(40, 40)] * 3)
    out = tmp_path / "out"
    base = ["prepare", "folder", str(source), str(out), "--workers", "0", "--quiet"]
    cases = [(["--resolution", "0"], "--resolution must be positive"),
             (["--crop-fraction", "0"], "crop_fraction must be in (0, 1]"),
             (["--crop-fraction", "1.5"], "crop_fraction must be in (0, 1]"),
             (["--shard-size", "0"], "--shard-size must be positive")]
    for extra, message in cases:
        assert exit_status(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists(), extra
    assert cli.main(["prepare", "folder", str(tmp_path / "none"), str(out), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(base + ["--resolution", "32"]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    (source / "zz-broken.png").write_bytes(b"not a png")
    assert cli.main(base + ["--resolution", "32"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "zz-broken.png" in error
    assert list(out.iterdir()) == []  # what it wrote before the bad file was removed
    (source / "zz-broken.png").unlink()
    write_images(source / "small", [(20, 30)])
    assert cli.main(base + ["--resolution", "32", "--no-upscale"]) == 2
    assert "small/000.png: smaller than 32×32" in capsys.readouterr().err and list(out.iterdir()) == []
    with caplog.at_level("WARNING", logger="hitlib.data"):
        assert cli.main(base + ["--resolution", "32"]) == 0
    assert "1 of 4 images are smaller than 32×32 and were enlarged" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["upscaled"] == 1
    script = subprocess.run([sys.executable, str(ROOT / "datasets" / "prepare.py"), "folder", str(source),
                             str(tmp_path / "o2"), "--resolution", "0"], capture_output=True, text=True, timeout=600)
    assert script.returncode == 2 and "Traceback" not in script.stderr


def test_dry_run_prints_the_recipe_and_builds_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--recipe", "ffhq-256", "--dry-run", "g_lr=2e-5", "latent_dim=256"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved == recipes.train_config("ffhq-256", ["g_lr=2e-5", "latent_dim=256"]).to_dict()
    assert (resolved["recipe"], resolved["generator"], resolved["batch_size"], resolved["bcr_weight"]) == (
        "ffhq-256", "hit-b-256", 256, 10.0)
    assert list(tmp_path.iterdir()) == []  # no workdir, no file
    assert cli.main(["train", "--recipe", "ffhq", "--dry-run"]) == 2
    assert "unknown recipe 'ffhq'" in capsys.readouterr().err


def test_workdir_that_is_a_file_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert cli.main(["train", "--workdir", str(tmp_path / "afile"), "--quiet", *SMALL]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- --protocol hit (chapter 12d)
@pytest.fixture(scope="module")
def keras_weights(tmp_path_factory):
    "A converted-weights file of random weights for Keras' Inception-v3 (chapter 12d's format)."
    flat = keras_inception.random_keras_weights(seed=3)
    return keras_inception.save_keras_weights(tmp_path_factory.mktemp("keras") / "random_keras.npz", flat)


def test_hit_protocol_stats_then_fid_and_is(capsys, run_dir, keras_weights, digits, tmp_path):
    options = ["--protocol", "hit", "--inception-weights", str(keras_weights), "--batch-size", "8", "--quiet"]
    stats_file = tmp_path / "digits_hit.npz"
    assert cli.main(["stats", str(stats_file), "--data", str(digits), "--resolution", "32", *options]) == 0
    assert "12 images of 'digits' at 32×32 (protocol hit" in capsys.readouterr().out
    stats = evaluate.load_stats(stats_file, expected_protocol="hit")
    fingerprint = evaluate.weights_fingerprint(keras_inception.load_keras_inception_weights(keras_weights))
    assert stats["weights"] == fingerprint and stats["num_samples"] == 12
    base = ["eval", "--workdir", str(run_dir), "--num-samples", "10", "--stats", str(stats_file), "--dataset", "digits"]
    for metric in ("fid", "is"):
        assert cli.main([*base, "--metric", metric, *options]) == 0
        assert "step 2, 10 samples of the EMA generator" in capsys.readouterr().out
        result = json.loads((run_dir / "eval" / f"{metric}_step0000002.json").read_text())
        assert (result["protocol"], result["weights"], result["num_samples"]) == ("hit", fingerprint, 10)
    assert result["is_mean"] >= 1.0 - 1e-6
    # the same statistics under the standard protocol: refused in one line, before any weights are read
    assert cli.main([*base, "--metric", "fid", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'hit' FID protocol, but this evaluation uses 'standard'" in err and len(err.strip().splitlines()) == 1


def test_hit_protocol_weights_file_is_checked_first(capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(keras_inception.KERAS_WEIGHTS_ENV, str(tmp_path / "none.npz"))
    base = ["eval", "--workdir", str(run_dir), "--num-samples", "10", "--metric", "is", "--protocol", "hit"]
    np.savez(tmp_path / "foreign.npz", kernel=np.zeros(3, np.float32))  # not Keras' Inception weights
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    for weights, message in ((None, "no Keras Inception weights at"), ("junk.npz", "is not a readable .npz"),
                             ("foreign.npz", "missing key 'batch_normalization/beta'")):
        extra = [] if weights is None else ["--inception-weights", str(tmp_path / weights)]
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and str(tmp_path / (weights or "none.npz")) in err and len(err.splitlines()) == 1
    assert cli.main(["stats", str(tmp_path / "out.npz"), "--protocol", "hit"]) == 2
    assert "no Keras Inception weights at" in capsys.readouterr().err and not (tmp_path / "out.npz").exists()
    assert cli.main(["eval", "--workdir", str(run_dir), "--metric", "fdd", "--protocol", "hit"]) == 2
    assert "--protocol chooses the Inception network" in capsys.readouterr().err
