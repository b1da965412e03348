#!/usr/bin/env python
"""psadv's FAB-T against torchattacks' FAB on the same model and images. (A check, not a test.)

Runs :func:`psadv.attacks.fab.fab_attack` and ``torchattacks.FAB(multi_targeted=True)`` with the
same settings (100 steps, one run per target, 9 targets = the other classes ranked by logit) and
prints robust accuracy, wall and CPU seconds (one thread: CPU seconds are the less
noisy on a shared machine) and how many examples the two disagree on:

    python scripts/fab_check.py --checkpoint ../main/runs/attackers/n1-refine0-seed0 \\
        --data-dir ../shared/data/mnist --examples 300 --norm linf --eps 0.3

torchattacks is an independent reference implementation, installed only for this check
(``pip install --no-deps torchattacks``). Both run on one thread. ``--psadv-projections`` runs
torchattacks with psadv's projections onto the hyperplane ∩ box in place of its own, to tell
whether a disagreement comes from them (torchattacks' float32 L2 projection sometimes misses the
hyperplane and returns the far corner of the box instead of the nearest point).
"""

from __future__ import annotations

import argparse
import time

import torch

from psadv.attacks.fab import fab_attack
from psadv.checkpoint import open_checkpoint
from psadv.data import load_dataset

TORCHATTACKS_NORM = {"linf": "Linf", "l2": "L2"}


def use_psadv_projections(fab_module) -> None:
    """Replace torchattacks' projections (hyperplane ``<w, z> = b``) by psadv's (offset ``c = <w, p> − b``)."""
    from psadv.attacks.fab import project_l2, project_linf

    for name, ours in (("projection_l2", project_l2), ("projection_linf", project_linf)):
        setattr(fab_module, name, lambda p, w, b, ours=ours: ours(p, w, (w * p).sum(1) - b))


def robust_flags(model, x, y, x_adv, norm: str, eps: float) -> torch.Tensor:
    """Correct on the adversarial point, or that point outside the ε-ball (then it does not count)."""
    with torch.no_grad():
        correct = model(x_adv).argmax(1) == y
    flat = (x_adv - x).flatten(1)
    dist = flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)
    return correct | (dist > eps + 1e-6) | (x_adv.min() < 0) | (x_adv.max() > 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--examples", type=int, default=300, help="first N test images")
    parser.add_argument("--norm", choices=sorted(TORCHATTACKS_NORM), default="linf")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--psadv-projections", action="store_true",
                        help="run torchattacks with psadv's projections (isolates them as a cause)")
    args = parser.parse_args()

    import torchattacks
    import torchattacks.attacks.fab

    if args.psadv_projections:
        use_psadv_projections(torchattacks.attacks.fab)

    torch.set_num_threads(1)
    ckpt, model = open_checkpoint(args.checkpoint)  # psadv's registry models: a factory the file names is not run
    test = load_dataset("mnist", "test", args.data_dir)
    x, y = torch.tensor(test.x[:args.examples]), torch.tensor(test.y[:args.examples])
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()

    start, cpu = time.perf_counter(), time.process_time()
    ours = fab_attack(model, x, y, norm=args.norm, eps=args.eps, steps=args.steps)
    ours_s, ours_cpu = time.perf_counter() - start, time.process_time() - cpu

    reference = torchattacks.FAB(model, norm=TORCHATTACKS_NORM[args.norm], eps=args.eps, steps=args.steps,
                                 n_restarts=1, multi_targeted=True, n_classes=10)
    start, cpu = time.perf_counter(), time.process_time()
    theirs = reference(x, y)
    theirs_s, theirs_cpu = time.perf_counter() - start, time.process_time() - cpu
    model.zero_grad(set_to_none=True)  # torchattacks' backward also fills parameter gradients

    ours_robust = robust_flags(model, x, y, ours, args.norm, args.eps)
    theirs_robust = robust_flags(model, x, y, theirs, args.norm, args.eps)
    print(f"{ckpt.path}: {args.examples} test images, {args.norm} eps={args.eps:g}, "
          f"{args.steps} steps x 9 targets, clean accuracy {100 * clean:.1f}%")
    print("| implementation | robust accuracy | wall seconds | CPU seconds |")
    print("|---|---|---|---|")
    print(f"| psadv fab_attack | {100 * ours_robust.float().mean().item():.1f}% | {ours_s:.1f} | {ours_cpu:.1f} |")
    reference_name = "torchattacks.FAB" + (" (psadv projections)" if args.psadv_projections else "")
    print(f"| {reference_name} | {100 * theirs_robust.float().mean().item():.1f}% | {theirs_s:.1f} "
          f"| {theirs_cpu:.1f} |")
    print(f"examples on which they disagree: {(ours_robust != theirs_robust).sum().item()} "
          f"(robust only for psadv: {(ours_robust & ~theirs_robust).sum().item()}, "
          f"only for torchattacks: {(theirs_robust & ~ours_robust).sum().item()})")


if __name__ == "__main__":
    main()
