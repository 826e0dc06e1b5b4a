"""``python -m vgpu_backend``."""

import sys

from vgpu_backend.cli import main

sys.exit(main())
