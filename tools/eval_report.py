#!/usr/bin/env python
"""``pvt-d2-report`` run from a checkout; the code is :mod:`pvt_d2.cli.eval_report`."""
import sys

from pvt_d2.cli.eval_report import main

if __name__ == "__main__":
    sys.exit(main())
