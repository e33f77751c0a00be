import os

# Simulated devices must be requested before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

# torchvision (test-only, for the timm / open_clip references) imports beside the CPU torch only with this stub,
# here and in every process the tests launch.
_SUPPORT = str(Path(__file__).parent / "support")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SUPPORT, os.environ.get("PYTHONPATH")) if p)
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

# Tests share one feature cache of their own, never the user's ~/.cache/fxjax.
os.environ.setdefault("FXJAX_CACHE_DIR", tempfile.mkdtemp(prefix="fxjax-test-cache-"))
