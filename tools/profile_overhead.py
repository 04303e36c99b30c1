"""Overhead profiler of AttnRes against standard residuals (same as the ``attnres-profile`` command).

Example: ``python tools/profile_overhead.py --device cpu --num-layers 4 --timed-steps 5``;
``--help`` lists every flag. See the README section "Overhead profiler".
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from attnres_megatron.profiling.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
