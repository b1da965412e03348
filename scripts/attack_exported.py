"""Attack an exported psadv MNIST model with another library, without psadv.

Reads ``psadv export``'s .safetensors with plain ``safetensors`` + torch, rebuilds the mnist-small
architecture by hand, and measures clean and PGD accuracy with torchattacks on the MNIST test set
(the official IDX files)::

    psadv export runs/mnist -o mnist.safetensors
    python scripts/attack_exported.py mnist.safetensors ../shared/data/mnist --examples 1000

Prints one JSON object: examples, clean_acc, robust_acc, eps, steps.
"""

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import torch
import torchattacks
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn


def mnist_small(num_classes: int = 10) -> nn.Module:
    """psadv's mnist-small: the same layers in the same order, so the state-dict keys match."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, num_classes))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format)."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a .safetensors file from psadv export")
    parser.add_argument("mnist_dir", type=Path, help="directory with t10k-images-idx3-ubyte.gz and labels")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    with safe_open(str(args.model), framework="pt") as handle:
        meta = handle.metadata()
    if meta["model_name"] != "mnist-small":
        raise SystemExit(f"this example rebuilds mnist-small, the file holds {meta['model_name']}")
    model = mnist_small(int(meta["num_classes"]))
    model.load_state_dict(load_file(str(args.model)))
    model.eval()

    images = read_idx(args.mnist_dir / "t10k-images-idx3-ubyte.gz")[:args.examples]
    labels = read_idx(args.mnist_dir / "t10k-labels-idx1-ubyte.gz")[:args.examples]
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0  # [0, 1], as psadv trains
    y = torch.tensor(labels, dtype=torch.int64)

    eps = float(meta["eps"])
    attack = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / args.steps, steps=args.steps, random_start=True)
    torch.manual_seed(0)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    robust = (model(attack(x, y)).argmax(1) == y).float().mean().item()
    print(json.dumps({"examples": len(y), "clean_acc": clean, "robust_acc": robust, "eps": eps,
                      "steps": args.steps}))


if __name__ == "__main__":
    main()
