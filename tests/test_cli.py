"""Chapter 13: the `hitlib` command — summary, train (with resume), sample, interpolate, eval (FDD, FID, IS, KID).

FID, IS and KID run on a file of random Inception weights made here (`random_inception_v3`): no download; what is
tested is the command's plumbing, the library's numbers are tested in test_metrics_evaluate.py."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jax

from hitlib import cli, config, data, evaluate, generator, inception, train

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
    assert "batch_size must be an integer >= 1" in capsys.readouterr().err
    assert cli.main(["sample", "--workdir", str(tmp_path / "nothing")]) == 2
    assert "holds no training run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--workdir", str(tmp_path), "--metric", "accuracy"])


def test_train_resume_sample_eval(capsys, tmp_path):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--workdir", str(workdir), "--steps", "2", "--quiet", *SMALL]) == 0
    assert "to step 2" in capsys.readouterr().out
    saved = train.load_config(workdir)
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
                            timeout=60)
    assert result.returncode == 0 and all(word in result.stdout
                                          for word in ("summary", "train", "sample", "interpolate", "eval"))


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
    ends = np.asarray(train.sample_latents(train.load_config(run_dir), 6, seed=2))
    np.testing.assert_array_equal(z[:, 0], ends[:3])  # exact: t = 0 and t = 1 are the latents themselves
    np.testing.assert_array_equal(z[:, -1], ends[3:])
    np.testing.assert_allclose(z[:, 2], (ends[:3] + ends[3:]) / 2, rtol=1e-6, atol=1e-7)  # atol: values near 0
    run = train.load_run(run_dir)
    expected = data.to_uint8(train.generate(run.generator, z.reshape(15, 16))).reshape(images.shape)
    np.testing.assert_array_equal(images, expected)
    assert cli.main(["interpolate", "--workdir", str(run_dir), "--num", "1"]) == 2
    assert "--num must be at least 2" in capsys.readouterr().err


def test_stats_then_fid_is_kid(capsys, run_dir, weights, digits, tmp_path):
    options = ["--weights", str(weights), "--batch-size", "8", "--quiet"]
    stats_file = tmp_path / "digits.npz"
    assert cli.main(["eval", "--stats", str(stats_file), "--data", str(digits), "--resolution", "32", "--features",
                     *options]) == 0
    assert "reference statistics of 12 images of 'digits' at 32×32" in capsys.readouterr().out
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
    assert cli.main(["eval", "--stats", str(tmp_path / "out.npz")]) == 2
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
    assert cli.default_num_samples("fid", "ffhq") == 50_000 and cli.default_num_samples("kid", "mnist5k") == 50_000
    assert cli.default_num_samples("fid", "CelebA-HQ") == 30_000
    assert cli.default_num_samples("is", "celebahq256") == 30_000
    assert cli.default_num_samples("fdd", "mnist5k") == 5000
    assert cli.dataset_name(None) == "mnist5k" and cli.dataset_name("/data/celeba_hq/") == "celeba_hq"
