"""python -m cgc_kernels.cli"""

import sys

from . import main

sys.exit(main())
