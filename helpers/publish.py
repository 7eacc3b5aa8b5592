"""`python -m helpers.publish`: the command line of helpers/sweeps/publish.py, kept at its old name."""
import sys

from helpers.sweeps.publish import main

if __name__ == "__main__":
    sys.exit(main())
