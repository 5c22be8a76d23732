"""The second converter, jax2tf -> TensorFlow -> tf2onnx, run in its own pinned venv (see env.py, backend.py).

Nothing here imports TensorFlow or old JAX into the main process: `worker` runs only in the legacy venv.
"""
