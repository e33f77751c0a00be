"""Test-only: lets PyPI's torchvision (a CUDA build, needed by the timm / open_clip references) import beside the
CPU torch. Its `_meta_registrations` registers CUDA ops that the CPU build lacks; an empty module stands in.
tests/conftest.py puts this folder on PYTHONPATH, so processes the tests launch get it too."""

import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
