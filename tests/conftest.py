"""Shared test setup: float32 everywhere, hypothesis profiles sized for a 2-core CI machine."""
import os
import tempfile

from hypothesis import settings

# `hitlib`'s commands turn on JAX's persistent compilation cache; in the tests it lives in a
# fresh folder, never the user's (set before JAX is imported, which reads it then)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="hitlib-jax-cache-"))

settings.register_profile("ci", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
