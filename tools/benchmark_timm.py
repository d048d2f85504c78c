#!/usr/bin/env python
"""``pvt-d2-benchmark-timm`` run from a checkout; the code is :mod:`pvt_d2.cli.benchmark_timm`."""
import sys

from pvt_d2.cli.benchmark_timm import main

if __name__ == "__main__":
    sys.exit(main())
