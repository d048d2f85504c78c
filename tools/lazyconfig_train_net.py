#!/usr/bin/env python
"""``pvt-d2-lazy-train`` run from a checkout; the code is :mod:`pvt_d2.cli.lazyconfig_train_net`."""
import sys

from pvt_d2.cli.lazyconfig_train_net import cli

if __name__ == "__main__":
    sys.exit(cli())
