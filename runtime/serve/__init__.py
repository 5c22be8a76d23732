"""The HTTP service over the lean core: FastAPI app, bounded body I/O, settings, metrics, request log, the page.

Nothing in the core (``runtime/*.py``) imports this package; it imports FastAPI and prometheus-client (the
``serve`` extra). ``runtime.serve.service`` and the other plain-Python parts take no FastAPI types.
"""
