#!/usr/bin/env python
"""``pvt-d2-quickstart`` run from a checkout; the code is :mod:`pvt_d2.cli.quickstart`."""
import sys

from pvt_d2.cli.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
