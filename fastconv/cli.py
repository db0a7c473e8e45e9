"""The ``fastconv`` command: ``info``, ``bench`` and ``train`` sub-commands.

Each sub-command lives in its own module, imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import Sequence

#: sub-command -> module providing ``add_arguments(parser)`` and ``run(args) -> int``
SUBCOMMANDS = {
    "info": ("fastconv.cli", "show backends, threads, BLAS and versions"),
    "bench": ("fastconv.benchmark", "time every backend on the layer suite"),
    "train": ("fastconv.train", "train a small CNN (stripes or MNIST)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:  # ``fastconv info`` takes no options
    pass


def run(args: argparse.Namespace) -> int:
    """``fastconv info``: backends (available or why not), threads, BLAS, versions."""
    import numpy as np

    import fastconv

    print(f"fastconv {fastconv.__version__}  (Python {platform.python_version()}, NumPy {np.__version__}, "
          f"{platform.machine()})")
    print(f"threads: {fastconv.get_num_threads()}   workspace limit: {fastconv.get_workspace_limit() / 2**20:.0f} MiB"
          f"   default backend: {fastconv.get_backend()}")
    from fastconv import _config

    for lib in _config.blas_libraries():
        print(f"BLAS: {lib.get('internal_api')} {lib.get('version')} ({lib.get('num_threads')} threads, "
              f"{lib.get('architecture', '?')})  {lib.get('filepath')}")
    print("backends:")
    for name, info in fastconv.available_backends().items():
        if info["available"]:
            extra = {k: v for k, v in info.items() if k not in ("available", "reason", "algorithms")}
            details = "  ".join(f"{k}={v}" for k, v in extra.items())
            print(f"  {name:<10} available    algorithms: {', '.join(info['algorithms'])}  {details}")
        else:
            print(f"  {name:<10} unavailable  {info['reason']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastconv", description="fast 2-D convolution and pooling kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, helptext) in SUBCOMMANDS.items():
        sub.add_parser(name, help=helptext, description=helptext, add_help=False)  # -h reaches the module
    # parse the command name first, then let its module define its own options
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    cmd_parser = argparse.ArgumentParser(prog=f"fastconv {args.command}",
                                         description=SUBCOMMANDS[args.command][1])
    module.add_arguments(cmd_parser)
    return int(module.run(cmd_parser.parse_args(rest)) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
