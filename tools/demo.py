#!/usr/bin/env python
"""``pvt-d2-demo`` run from a checkout; the code is :mod:`pvt_d2.cli.demo`."""
import sys

from pvt_d2.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
