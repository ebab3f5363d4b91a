"""Fake `mani_skill2_real2sim`: the asset-directory rule of the real package."""

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent.resolve()
if os.getenv("MS2_REAL2SIM_ASSET_DIR") is not None:
    ASSET_DIR = Path(os.getenv("MS2_REAL2SIM_ASSET_DIR"))
else:
    ASSET_DIR = PACKAGE_DIR.parent.resolve() / "data"
