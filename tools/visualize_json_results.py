#!/usr/bin/env python
"""``pvt-d2-visualize-results`` run from a checkout; the code is :mod:`pvt_d2.cli.visualize_json_results`."""
import sys

from pvt_d2.cli.visualize_json_results import main

if __name__ == "__main__":
    sys.exit(main())
