"""Serving a release: the MLflow pyfunc flavor (``mlflow models serve``)."""
