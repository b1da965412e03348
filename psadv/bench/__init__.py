"""What psadv's benchmark scripts (``scripts/``) share, apart from the commands and the report.

* :mod:`.budget` — the budget search's policy: which ``--time-budget`` to try next;
* :mod:`.child` — a script's child commands, stopped with the script by its signals.
"""
