"""Images as the bytes a file or a TFDS record holds, for the real datasets tests build."""

import io

import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray) -> bytes:
    """An [h, w, 3] uint8 array encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
