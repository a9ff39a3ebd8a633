"""REST API (FastAPI). Never imports torch or the engine: only `core.spec` and `jobs`."""
