"""``python -m retina_fast ...`` = ``retina-fast ...``."""
import sys

from retina_fast.cli import main

sys.exit(main())
