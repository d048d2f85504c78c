"""Command-line programs of pvt_d2 (the ``pvt-d2-*`` commands); ``tools/*.py`` call them from a checkout."""
