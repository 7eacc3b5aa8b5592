"""`python -m helpers.sweep`: the command line of helpers/sweeps/sweep.py, kept at its old name."""
import sys

from helpers.sweeps.sweep import main

if __name__ == "__main__":
    sys.exit(main())
