"""`python -m pretrain <command> ...`: each command is a module with `add_arguments` and `main`.

Errors print one line and exit 2 (bad config, data or storage) or 1; `--debug` or
VITSCALE_DEBUG=1 shows the traceback (data_pipeline.errors)."""
from __future__ import annotations

import argparse
import importlib
import sys

from data_pipeline.errors import run_cli

# Imported lazily: `python -m pretrain fewshot` should not pay for DeepSpeed's import.
COMMANDS = {
    "train": ("pretrain.tasks.pretrain", "pretrain a model from a YAML recipe (DeepSpeed ZeRO)"),
    "export": ("pretrain.checkpoint.export", "export a training checkpoint to one safetensors file"),
    "twin": ("pretrain.checkpoint.twin", "the random-init twin of an exported model (a baseline)"),
    "fewshot": ("pretrain.tasks.fewshot", "few-shot linear evaluation of an exported model"),
    "transfer": ("pretrain.tasks.finetune", "fine-tune an exported model on a labelled data set"),
    "report": ("pretrain.tasks.report", "table of transfer and few-shot results from MLflow"),
    "analyze": ("pretrain.analysis.cli", "attention distance, CKA and attention maps of a model"),
    "detect": ("pretrain.tasks.detection.cli", "DETR-style detection transfer of a pretrained backbone"),
    "demo": ("pretrain.tasks.demo", "the whole path on Fashion-MNIST and digits, on CPU"),
}


def main(argv: list[str] | None = None) -> int:
    """Errors are raised here (tests, notebooks call it); the command line prints them in one line."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m pretrain {" + ",".join(COMMANDS) + "} ...\n", file=sys.stderr)
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:10s} {help_}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    parser = argparse.ArgumentParser(prog=f"python -m pretrain {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(parser)
    return module.main(parser.parse_args(argv[1:])) or 0


if __name__ == "__main__":
    sys.exit(run_cli("python -m pretrain", main))
