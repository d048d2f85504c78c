#!/usr/bin/env python
"""``pvt-d2-convert`` run from a checkout; the code is :mod:`pvt_d2.cli.convert_pretrained`."""
import sys

from pvt_d2.cli.convert_pretrained import main

if __name__ == "__main__":
    sys.exit(main())
