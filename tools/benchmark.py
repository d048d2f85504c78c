#!/usr/bin/env python
"""``pvt-d2-benchmark`` run from a checkout; the code is :mod:`pvt_d2.cli.benchmark`."""
import sys

from pvt_d2.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
