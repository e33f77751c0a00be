"""A page rendered by a real headless browser, for the report tests: the screenshot as RGB pixels."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def screenshot(page: Path, shot: Path, size: str = "1200,1400") -> np.ndarray:
    """Renders `page` headless into `shot`; → its pixels [h, w, 3] as int. Skips the test without a browser."""
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless browser installed (apt-get install chromium): the report's rendering is unchecked")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--hide-scrollbars",
                f"--window-size={size}",
                f"--screenshot={shot}",
                page.absolute().as_uri(),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert shot.is_file(), "the browser wrote no screenshot"
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)
