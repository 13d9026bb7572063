"""``python -m numcast ...``: the command line (:func:`numcast.cli.main`), also as
``torchrun --nproc-per-node N -m numcast quantize ...``."""

import sys

from numcast.cli import main

sys.exit(main())
