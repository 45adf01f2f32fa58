"""`python -m minisd ...`: the same command line as `minisd ...` (minisd sweep runs its trials this way)."""
import sys

from minisd.cli import main

sys.exit(main())
