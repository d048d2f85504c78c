#!/usr/bin/env python
"""``pvt-d2-plot-metrics`` run from a checkout; the code is :mod:`pvt_d2.cli.plot_metrics`."""
import sys

from pvt_d2.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
