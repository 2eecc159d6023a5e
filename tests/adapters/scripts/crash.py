"""Rank 1 crashes at once; rank 0 would wait forever (as in a collective)."""

import os
import sys
import time
from pathlib import Path

if os.environ["RANK"] == "1":
    print("boom: rank 1 cannot read its partition", flush=True)
    sys.exit(3)
Path(os.environ["MESHSERVE_JOB_DIR"], "rank0.pid").write_text(str(os.getpid()))
time.sleep(600)
