#!/usr/bin/env python
"""``pvt-d2-visualize-data`` run from a checkout; the code is :mod:`pvt_d2.cli.visualize_data`."""
import sys

from pvt_d2.cli.visualize_data import main

if __name__ == "__main__":
    sys.exit(main())
