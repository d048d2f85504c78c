"""The command-line tools of pvt_d2 (each ``tools/X.py`` calls ``pvt_d2.cli.X.main``)."""
