"""Runnable demonstrations: ``python -m fastres.demo.vanishing_gradients --help``."""
