import os

# Simulated devices must be requested before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tempfile  # noqa: E402

# Tests share one feature cache of their own, never the user's ~/.cache/fxjax.
os.environ.setdefault("FXJAX_CACHE_DIR", tempfile.mkdtemp(prefix="fxjax-test-cache-"))
