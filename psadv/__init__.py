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

import sys
import types

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


class _Package(types.ModuleType):
    """``psadv.evaluate`` is the function even after the submodule ``psadv.evaluate`` is imported.

    Importing a submodule binds it as an attribute of its package; that binding is skipped for
    the API's names, so they keep resolving through ``__getattr__`` (the submodules stay in
    ``sys.modules``, where ``from psadv.evaluate import measure_accuracy`` finds them).
    """

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
