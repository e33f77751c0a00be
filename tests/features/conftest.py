"""Fixtures of the feature tests: a gs:// store that etils.epath reaches offline."""

import pytest
from fsspec.implementations.memory import MemoryFileSystem


class _StandInGcs(MemoryFileSystem):
    """fsspec's in-memory file system under the gs:// protocol: etils.epath's own gs:// backend (fsspec) runs
    unchanged on it, offline."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes gcsfs's option
        super().__init__(*args, **kwargs)


@pytest.fixture
def gcs():
    """A gs:// cache root on the stand-in, empty at the start and the end of the test."""
    import fsspec
    from etils.epath import gpath

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, _StandInGcs, clobber=True)
    gpath._PREFIX_TO_BACKEND["gs"]._get_filesystem.cache_clear()
    _StandInGcs.store.clear()
    yield "gs://bucket/fxjax-cache"
    _StandInGcs.store.clear()
    gpath._PREFIX_TO_BACKEND["gs"]._get_filesystem.cache_clear()
