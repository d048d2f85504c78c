#!/usr/bin/env python
"""``pvt-d2-export`` run from a checkout; the code is :mod:`pvt_d2.cli.export_model`."""
import sys

from pvt_d2.cli.export_model import main

if __name__ == "__main__":
    sys.exit(main())
