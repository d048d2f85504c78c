#!/usr/bin/env python
"""Write a report of where a detector fails: ``python tools/eval_report.py RUN`` (see pvt_d2/cli/eval_report.py)."""
import sys

from pvt_d2.cli.eval_report import main

sys.exit(main())
