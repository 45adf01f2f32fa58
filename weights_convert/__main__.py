"""`python -m weights_convert SRC DST --to minisd|ldm|diffusers`: the conversion command, which lives in
minisd/convert.py because it checks each tensor against minisd's networks (the key maps here need only
minisd.config). This launcher is never imported by the library."""
import sys

from minisd.convert import main

if __name__ == "__main__":
    sys.exit(main())
