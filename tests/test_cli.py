"""Chapter 13: the `hitlib` command — summary, train (with resume), sample, eval."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hitlib import cli, config, generator, train

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

    assert cli.main(["eval", "--workdir", str(workdir), "--num", "200"]) == 0
    assert "fdd" in capsys.readouterr().out
    result = json.loads((workdir / "eval" / "fdd_step0000004.json").read_text())
    assert result["step"] == 4 and result["num_samples"] == 200 and result["fdd"] > 0


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "hitlib", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and all(word in result.stdout for word in ("summary", "train", "sample", "eval"))
