#!/usr/bin/env python
"""``pvt-d2-analyze`` run from a checkout; the code is :mod:`pvt_d2.cli.analyze_model`."""
import sys

from pvt_d2.cli.analyze_model import main

if __name__ == "__main__":
    sys.exit(main())
