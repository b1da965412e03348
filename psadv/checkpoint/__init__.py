"""Checkpoint files, in three layers, each importing only the ones before it:

- :mod:`psadv.checkpoint.codec`: the HDF5 format (its module docstring is the format reference),
  atomic writes, reading, describing; no configurations or models.
- :mod:`psadv.checkpoint.rotation`: a run's numbered checkpoints, the newest kept, written under the
  run directory's lock; a run directory resolved to its newest checkpoint.
- :mod:`psadv.checkpoint.restore`: from a file to live objects: the recorded model, built only as
  the caller trusts, and contents that do not fit as one line.

The public names of all three are here too, for ``from psadv.checkpoint import load_checkpoint``;
psadv's own modules import from the layer they need.
"""

from .codec import (FORMAT, FORMAT_VERSION, Checkpoint, capture_rng_state, damaged, describe_checkpoint,
                    load_checkpoint, restore_rng_state, save_checkpoint)
from .restore import (READ_CONFIG, IncompatibleCheckpoint, UntrustedFactory, build_recorded_model, check_trusted,
                      load_recorded_state, open_checkpoint, recorded_architecture, restoring)
from .rotation import CheckpointManager, checkpoint_name, checkpoint_version, find_checkpoint, list_checkpoints

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "capture_rng_state", "damaged", "describe_checkpoint",
           "load_checkpoint", "restore_rng_state", "save_checkpoint", "READ_CONFIG", "IncompatibleCheckpoint",
           "UntrustedFactory", "build_recorded_model", "check_trusted", "load_recorded_state", "open_checkpoint",
           "recorded_architecture", "restoring", "CheckpointManager", "checkpoint_name", "checkpoint_version",
           "find_checkpoint", "list_checkpoints"]
