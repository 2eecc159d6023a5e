"""Runs until killed; records its pid."""

import os
import time
from pathlib import Path

Path(os.environ["MESHSERVE_JOB_DIR"], f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
time.sleep(600)
