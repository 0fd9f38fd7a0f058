"""Shared test setup: float32 parity, hypothesis profiles sized for a 2-core CI machine,
and the compilation cache in a folder of the tests' own."""
import os
import tempfile

import pytest
from hypothesis import settings

# `hitlib`'s commands turn on JAX's persistent compilation cache; in the tests it lives in a
# fresh folder, never the user's (set before JAX is imported, which reads it then)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="hitlib-jax-cache-"))

settings.register_profile("ci", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def full_float32_precision():
    """Parity needs true float32 products and convolutions: JAX's default may be TF32
    on GPUs or bfloat16 passes on TPUs. A parity module asks for it with
    `pytestmark = pytest.mark.usefixtures("full_float32_precision")`."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield
