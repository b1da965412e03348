"""psadv: fast adversarial training with weaker adversaries and an asynchronous MPI parameter server.

From Python::

    import psadv
    summary = psadv.train({"epochs": 1}, data_dir="data", run_dir="runs/a")   # one process
    model = psadv.load_model("runs/a")                  # an nn.Module in eval mode, no MPI
    psadv.evaluate(model, dataset="mnist", data_dir="data", examples=1000)
    psadv.export_model("runs/a", "safetensors", "mnist.safetensors")

``train``, ``evaluate``, ``load_model`` and ``export_model`` live in :mod:`psadv.api`, ``Config``
in :mod:`psadv.config`; both are imported on first use, so ``import psadv`` stays light.
"""

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, DataError, PsadvError  # noqa: E402 - after __version__

__all__ = ["Config", "train", "evaluate", "load_model", "export_model", "PsadvError", "ConfigError", "DataError",
           "CheckpointError", "__version__"]
_API = ("train", "evaluate", "load_model", "export_model")


def __getattr__(name: str):
    if name == "Config":
        from .config import Config

        return Config
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'psadv' has no attribute {name!r}")

