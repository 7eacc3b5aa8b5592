"""`python -m helpers.fit`: the predictor's command line."""
import sys

from helpers.fit import main

sys.exit(main())
