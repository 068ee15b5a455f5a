"""``python -m pbrf_fast`` is the ``pbrf-fast`` command (also under ``torchrun -m pbrf_fast``)."""
import sys

from .cli import main

sys.exit(main())
