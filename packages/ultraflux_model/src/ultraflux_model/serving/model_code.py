"""MLflow "models from code" entry of a release: MLflow executes this file to build the served model.

Logged as code (not a pickle), so loading a release from the registry never unpickles anything; the weights
come from the release's manifest through the local cache (``ultraflux_model.release.manifest``). Not for import.
"""

from mlflow.models import set_model

from ultraflux_model.serving.pyfunc import UltraFluxPyfunc

set_model(UltraFluxPyfunc())
