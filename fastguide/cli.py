"""The `fastguide` command (also `python -m fastguide`).  Subcommands live in their own modules,
each exposing add_arguments(parser) and run(args); nothing imports this module."""
import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("fastguide.toy.demo", "the paper's 2D experiment: figures and metrics (the main job)"),
    "sample": ("fastguide.sample_cli", "sample a denoiser for a range of seeds, one file per seed"),
    "toy": ("fastguide.toy.cli", "toy experiment tools (train the shipped models)"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastguide", description="Guided diffusion sampling.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
