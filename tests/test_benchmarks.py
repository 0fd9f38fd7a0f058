"""The training-step benchmark's profile: where a compiled program's time goes, by kind of
work (benchmarks/train_step_speed.py --profile). Timings are printed, never asserted: these
tests check that the profiler's events are found and sorted, not how fast anything ran."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step_speed  # noqa: E402
from hitlib.config import get_config  # noqa: E402
from hitlib.generator import summary  # noqa: E402


@pytest.mark.parametrize(
    "name, kind",
    [
        ("ynn_fusion.394", "matmul"),
        ("dot.12", "matmul"),
        ("convolution.1", "matmul"),
        ("copy_bitcast_fusion.3", "transpose_or_copy"),
        ("transpose_copy_fusion", "transpose_or_copy"),
        ("bitcast_pad_fusion.7", "pad_slice_concat"),
        ("slice_bitcast_fusion.2", "pad_slice_concat"),
        ("wrapped_reduce-window.4", "reduce"),
        ("multiply_add_fusion.806", "elementwise"),
        ("negate_exponential_fusion", "elementwise"),
    ],
)
def test_kind_of_names_xla_instructions(name, kind):
    assert train_step_speed.kind_of(name) == kind


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads XLA's CPU thunks")
def test_profile_finds_the_matmuls_of_a_program():
    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    args = (jnp.ones((256, 256)), jnp.ones((512, 256)))
    compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
    profile = train_step_speed.profile(compiled, args)
    shares = {kind: entry["share"] for kind, entry in profile["by_kind"].items()}
    assert profile["thunk_seconds"] > 0
    # the forward and the weight gradient are matrix products; tanh's derivative is not
    assert shares.get("matmul", 0) > 0 and shares.get("elementwise", 0) > 0
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
    assert 0 < len(profile["slowest"]) <= 5


def test_inference_forward_counts_the_model_flops_not_the_tile_loops_body():
    # release-128's 128-pixel stage runs tile by tile in a loop at inference, and XLA's
    # cost analysis counts a loop's body once: the benchmark takes the model's FLOPs
    batch = 2  # 2 images x 128^2 pixels: four tiles of INFERENCE_TILE_TOKENS
    config = get_config("release-128")
    forward, args = train_step_speed.forward_program(config, batch)
    cost = forward.lower(*args).cost_analysis()  # the same count as compiled, no compile
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    model = summary(config)["flops"] * batch
    assert cost["flops"] < 0.8 * model  # the undercount the benchmark avoids
    result = train_step_speed.inference_forward(
        "release-128", batch, repeats=1, peak=1e11
    )
    assert result["gflops"] == pytest.approx(model / 1e9, abs=0.01)
    assert result["matmul_floor_seconds"] == pytest.approx(model / 1e11, rel=1e-3)
