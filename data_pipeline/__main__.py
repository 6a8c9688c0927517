"""`python -m data_pipeline write|inspect|verify ...`"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "write": ("data_pipeline.write_cli", "convert an image collection into WebDataset shards"),
    "inspect": ("data_pipeline.inspection", "counts, label histogram and a contact sheet of a shard folder"),
    "verify": ("data_pipeline.verify", "read every sample and check the shards against _info.json"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(module)
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=modules[name].__doc__))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return modules[args.command].main(args) or 0
    except (FileNotFoundError, PermissionError, ConnectionError, ValueError) as err:
        parser.exit(2, f"python -m data_pipeline {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
