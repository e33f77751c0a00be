"""NumPy `.npz` archives, the format of JAX/Flax research checkpoints (big_vision, google-research's
vision_transformer): flat names with `/` separators, one array each. Read with pickles refused, so a file can
hold arrays only."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fxjax.backbones.formats import CheckpointError, PathLike


def read_npz(path: PathLike) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file by its stored name (e.g. `Transformer/encoder_norm/scale`)."""
    path = Path(path)
    archive_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                # np.savez stores members uncompressed; a member larger than the archive is a bomb or corrupt.
                if info.compress_type == zipfile.ZIP_STORED and info.file_size > archive_size:
                    raise CheckpointError(f"{path}: entry '{info.filename}' claims {info.file_size} bytes")
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except CheckpointError:
        raise
    except Exception as e:  # zipfile, numpy header and pickle-refusal errors on corrupt or unsafe files
        raise CheckpointError(f"{path}: unreadable .npz archive (arrays only, no pickles): {e}") from e
