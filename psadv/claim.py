"""A RobustBench-style claim of a model's robustness, from one ``psadv eval --attack autoattack``.

RobustBench lists a model by a JSON file of its clean and AutoAttack accuracy (percent, as text),
its data set, threat model, ε (as text, ``"8/255"``), architecture and publication; the fields psadv
cannot know (link, authors, venue, reported) are left empty for the author to fill. The ``psadv``
object says how the numbers were measured: psadv's version, the command, the date, the examples
and each attack with its settings, and whether the evaluation was AutoAttack's standard one.
psadv's APGD-CE, APGD-T, FAB-T and Square are its own implementations (psadv/attacks), checked
against torchattacks' (scripts/attack_check.py), not the authors' autoattack package: the claim says so.
"""

from __future__ import annotations

import datetime as _dt

from .attacks.suite import EvalSettings

CLAIM_ATTACK = "autoattack"
# AutoAttack's standard version (Croce & Hein 2020): 100 iterations of APGD-CE, APGD-T and FAB-T,
# 9 target classes, 5000 Square queries, on the whole test set.
STANDARD = {"apgd_steps": EvalSettings.apgd_steps, "targets": EvalSettings.targets, "queries": EvalSettings.queries}
THREAT_MODELS = {"linf": "Linf", "l2": "L2"}  # RobustBench's spelling


def eps_text(eps: float) -> str:
    """ε as RobustBench writes it: ``8/255`` for a multiple of 1/255 below 1, else the number."""
    k = eps * 255
    if 0 < eps < 1 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:g}"


def percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def make_claim(record: dict, *, name: str, command: str, test_size: int, classes: int,
               date: _dt.date | None = None) -> dict:
    """The claim of an evaluation ``record`` (:func:`psadv.grading.evaluation_record` of the
    ``autoattack`` cascade on the first ``record["examples"]`` of ``test_size`` test examples)."""
    used = {key: value for row in record["attacks"] for key, value in row["settings"].items()}
    standard = {**STANDARD, "targets": min(STANDARD["targets"], classes - 1)}
    differs = sorted(key for key, value in standard.items() if used.get(key) != value)
    full = record["examples"] >= test_size
    return {
        "name": name,
        "link": "", "authors": "", "venue": "", "reported": "",  # for the author to fill
        "additional_data": False,  # psadv trains on the data set's own training split only
        "number_forward_passes": 1,
        "dataset": record["dataset"],
        "threat_model": THREAT_MODELS.get(record["norm"], record["norm"]),
        "eps": eps_text(record["eps"]),
        "architecture": record["model"],
        "clean_acc": percent(record["clean_acc"]),
        "autoattack_acc": percent(record["robust_acc"]),
        "psadv": {
            "version": record["psadv_version"],
            "command": command,
            "date": (date or _dt.date.today()).isoformat(),
            "model_version": record.get("version"),
            "checkpoint": record.get("checkpoint"),
            "examples": record["examples"],
            "test_examples": test_size,
            "attacks": [{"attack": row["attack"], "settings": row["settings"], "robust_acc": row["robust_acc"]}
                        for row in record["attacks"]],
            "masking_gap": record.get("masking_gap"),
            "standard_autoattack": full and not differs,
            "differs_from_standard": ([] if full else [f"first {record['examples']} of {test_size} test examples"])
            + [f"{key} {used.get(key)} (standard: {standard[key]})" for key in differs],
            "implementation": "psadv's own APGD-CE, APGD-T, FAB-T and Square (psadv/attacks), checked against "
                              "torchattacks 3.5.1, not the autoattack package",
        },
    }
