#!/usr/bin/env python
"""Write the per-variant detector configs under ``configs/`` from the family manifests.

    python tools/generate_configs.py          # write
    python tools/generate_configs.py --check  # fail if a file is stale

The code is :mod:`pvt_d2.model_zoo.generate` (recipe: :mod:`pvt_d2.model_zoo.recipes`).
"""
import os
import sys

from pvt_d2.model_zoo.generate import expected_files, main  # noqa: F401  (expected_files: generate_lazy_configs)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

if __name__ == "__main__":
    sys.exit(main(config_dir=CONFIG_DIR))
