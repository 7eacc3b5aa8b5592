"""`python -m helpers.report`: the command line of helpers/sweeps/report.py, kept at its old name."""
import sys

from helpers.sweeps.report import main

if __name__ == "__main__":
    sys.exit(main())
