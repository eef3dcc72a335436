"""serve.py's parts: the OpenAI protocol (api.py), the worker thread that owns the engine (worker.py),
the page's training runs (runs.py) and the Prometheus metrics (metrics.py)."""
