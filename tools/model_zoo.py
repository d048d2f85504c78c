#!/usr/bin/env python
"""Generate ``MODEL_ZOO.md``: size, cost and speed of every detector config.

    python tools/model_zoo.py                          # all configs -> MODEL_ZOO.md (~15 min on 2 cores)
    python tools/model_zoo.py --only pvt_v2_b0 --output /tmp/zoo.md
    python tools/model_zoo.py --check                  # MODEL_ZOO.md lists every config, params up to date
    python tools/model_zoo.py --params-only            # recount parameters, keep the file's GFLOPs / CPU ms

The code is :mod:`pvt_d2.model_zoo.table`; the published numbers are the family manifests'.
"""
import sys

from pvt_d2.model_zoo.table import main

if __name__ == "__main__":
    sys.exit(main())
