"""One folder per pipeline; see `pipeline_registry.py`."""
