"""Notebook glue: one module per notebook that needs more than a few calls (imported only by the notebooks; nothing
in the package imports it)."""
