"""Serving a release: the MLflow pyfunc flavor (``pyfunc``, and ``model_code`` that MLflow executes) and logging a
release as that model (``publish``). The module path ``ultraflux_model.serving.pyfunc`` is written into every
logged release's ``model_code.py``: it must stay importable for releases already in a registry."""
