"""`python -m unireg.cli` = `unireg`."""
import sys

from . import main

sys.exit(main())
