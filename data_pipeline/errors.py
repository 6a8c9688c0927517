"""One line per failure for the command lines (`python -m pretrain`, `python -m data_pipeline`).

A bad config, a missing shard, an unreachable bucket: the person at the terminal gets one line
naming the thing and what to do, and exit code 2. Anything else (a bug) gets one line and exit
code 1. The traceback only with `--debug` anywhere on the command line or `VITSCALE_DEBUG=1`.
Under a launcher (torchrun, srun) every rank would print the same line: only the first rank to
fail on a node does (it claims a marker file named after the launch; rank 0 fails first on a
config error, as it reads the config no later than the others).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

# Bad input, not a bug: configs (ConfigError and pydantic's errors are ValueErrors), data and
# storage (missing files, refused credentials, unreachable servers, a full disk).
USER_ERRORS = (ValueError, OSError, KeyError)
USER_EXIT, BUG_EXIT = 2, 1


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(traceback wanted, argv without `--debug`)."""
    rest = [a for a in argv if a != "--debug"]
    return len(rest) != len(argv) or os.environ.get("VITSCALE_DEBUG", "") not in ("", "0"), rest


def first_to_report() -> bool:
    """True in a lone process, and in the first rank of a launch to fail on this node."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    launch = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or os.environ.get("MASTER_PORT", "")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    marker = Path(tempfile.gettempdir()) / f"vitscale-failed-{os.getuid()}-{launch}-{attempt}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False


def one_line(err: BaseException) -> str:
    """A multi-line message (a config's list of problems) joined into one line."""
    text = str(err) if not isinstance(err, KeyError) else str(err.args[0] if err.args else err)
    out = ""
    for line in filter(None, (line.strip() for line in text.splitlines())):
        out += (" " if out.endswith(":") else "; " if out else "") + line
    return out or type(err).__name__


def run_cli(prog: str, main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """`main(argv)` with the handling above; returns the exit code."""
    debug, argv = debug_requested(sys.argv[1:] if argv is None else argv)
    if debug:
        return main(argv) or 0
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as err:
        code, line = USER_EXIT, f"{prog}: error: {one_line(err)}"
    except Exception as err:  # a bug: still one line, and how to see more
        code, line = BUG_EXIT, f"{prog}: internal error: {type(err).__name__}: {one_line(err)}"
    rank = os.environ.get("RANK")
    if first_to_report():
        where = f" (rank {rank})" if rank and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{line}{where}\n{prog}: run with --debug (or VITSCALE_DEBUG=1) for the traceback", file=sys.stderr, flush=True)
    return code
