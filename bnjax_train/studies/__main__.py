"""``python -m bnjax_train.studies NAME [NAME ...] [--quick] [--seeds N] [--out DIR]``."""

import sys

from bnjax_train.studies.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
