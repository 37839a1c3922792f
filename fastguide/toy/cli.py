"""`fastguide toy train`: retrain the shipped toy models (main, guide_auto, guide_cfg) into --out."""
import os
import sys
import time

import torch

from fastguide.toy.model import SHIPPED, WEIGHTS_DIR, save_file
from fastguide.toy.train import RECIPES, train_shipped


def add_arguments(parser):
    sub = parser.add_subparsers(dest="toy_command", required=True)
    train = sub.add_parser("train", help="train the shipped toy models by exact score matching",
                           description="Trains the toy models by exact score matching against the ground-truth "
                                       "mixture and writes <name>.safetensors files (the EMA weights).")
    train.add_argument("--out", default=WEIGHTS_DIR, help=f"output folder (default: the package's {WEIGHTS_DIR})")
    train.add_argument("--models", nargs="+", choices=SHIPPED, default=list(SHIPPED), help="which models to train")
    train.add_argument("--iterations", type=int, default=None,
                       help="training iterations for every chosen model (default: each recipe's own: "
                            + ", ".join(f"{name} {recipe[2]}" for name, recipe in RECIPES.items()) + ")")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")


def run(args):
    if args.iterations is not None and args.iterations < 1:
        print(f"fastguide toy train: --iterations must be >= 1, got {args.iterations}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"fastguide toy train: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    for name in args.models:
        start = time.perf_counter()
        ema_model, _, losses = train_shipped(name, args.iterations, seed=args.seed, log=print)
        elapsed = time.perf_counter() - start
        classes, hidden, default_iterations = RECIPES[name]
        iterations = args.iterations or default_iterations
        path = os.path.join(args.out, f"{name}.safetensors")
        save_file(ema_model, path, {"name": name, "classes": classes, "iterations": iterations, "seed": args.seed,
                                    "final_loss": f"{float(losses[-64:].mean()):.5f}",
                                    "train_seconds": f"{elapsed:.1f}"})
        print(f"{name}: {iterations} iterations in {elapsed:.1f}s, final loss {float(losses[-64:].mean()):.4f} -> {path}")
    return 0
