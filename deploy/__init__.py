"""Deployment shells over the runtime (Modal); nothing here is imported by `runtime`."""
