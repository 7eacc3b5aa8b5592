"""`python -m helpers.fit`: the predictor's command line (helpers.fit.main). `--report` executes notebook 03 into
reports/fit/, which is the runner's work (helpers.sweeps.report.build_fit_report): this entry point, the scripts
layer, calls it, so the predictor itself never imports the runner (tests/test_imports.py)."""
import sys

from helpers.fit import main

if "--report" in sys.argv[1:]:
    from helpers.sweeps.report import build_fit_report

    print(f"report: {build_fit_report()}")
    sys.exit(0)
sys.exit(main())
