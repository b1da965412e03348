"""psadv: fast adversarial training with weaker adversaries and an asynchronous MPI parameter server."""

__version__ = "0.1.0"
