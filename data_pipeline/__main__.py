"""`python -m data_pipeline write|inspect|verify ...`

Errors print one line and exit 2 (bad input, data or storage) or 1; `--debug` or
VITSCALE_DEBUG=1 shows the traceback (data_pipeline.errors)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from data_pipeline.errors import run_cli

COMMANDS = {
    "write": ("data_pipeline.write_cli", "convert an image collection into WebDataset shards"),
    "inspect": ("data_pipeline.inspection", "counts, label histogram and a contact sheet of a shard folder"),
    "verify": ("data_pipeline.verify", "read every sample and check the shards against _info.json"),
}


def main(argv: list[str] | None = None) -> int:
    """Errors are raised here (tests, notebooks call it); the command line prints them in one line."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(module)
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=modules[name].__doc__))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return modules[args.command].main(args) or 0


if __name__ == "__main__":
    sys.exit(run_cli("python -m data_pipeline", main))
