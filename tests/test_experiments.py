"""Chapter 15's runner, `experiments/ablations.py`: a cell of the grid trains, is scored and recorded, and a second
run of the grid skips it (resumable); a grid of another length is refused, not mixed in."""
import json
import math
import subprocess
import sys
from pathlib import Path

from hitlib import config as generator_config
from hitlib import recipes

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "experiments" / "ablations.py"


def run_grid(results, *args):
    return subprocess.run([sys.executable, str(RUNNER), "--results", str(results), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800, check=False)


def test_a_cell_is_recorded_once_and_skipped_when_the_grid_resumes(tmp_path):
    results = tmp_path / "results"
    first = run_grid(results, "--steps", "2", "--seeds", "0", "--only", "inr")
    assert first.returncode == 0, first.stderr
    grid = json.loads((results / "ablations.json").read_text())
    record = grid["runs"]["inr/seed0"]
    expected = generator_config.parameter_counts(
        recipes.train_config("tiny", ["cross_attention=false", "attention_stages=0"]).generator_config)
    assert record["parameters"] == expected["total"]
    assert record["steps"] == 2 and math.isfinite(record["fdd"]) and record["fdd"] > 0
    assert not (tmp_path / "runs" / "inr-seed0" / "checkpoints").exists()  # scored, then deleted

    again = run_grid(results, "--steps", "2", "--seeds", "0", "--only", "inr")
    assert again.returncode == 0 and again.stdout == "", again.stdout  # nothing retrained
    assert json.loads((results / "ablations.json").read_text()) == grid

    other = run_grid(results, "--steps", "3", "--seeds", "0", "--only", "inr")
    assert other.returncode != 0 and "holds a grid of 2 steps" in other.stderr
    assert json.loads((results / "ablations.json").read_text()) == grid


def test_a_variant_added_after_the_grid_began_joins_it(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    saved = {"steps": 2, "variants": {"inr": {"table": "5", "row": "as it ran", "generator": [],
                                               "training": []}}, "runs": {}}
    (results / "ablations.json").write_text(json.dumps(saved))
    sys.path.insert(0, str(RUNNER.parent))
    try:
        import ablations
    finally:
        sys.path.remove(str(RUNNER.parent))
    grid = ablations.load(results / "ablations.json", 2)
    assert grid["variants"]["inr"]["row"] == "as it ran"  # what ran is kept as it ran
    assert set(grid["variants"]) == set(ablations.VARIANTS)
    assert grid["variants"]["bcr"]["training"] == ["bcr_weight=10"]
