"""Several processes (``jax.distributed``): the flags every multi-host command takes, and starting the runtime.

The same three flags on every process; process 0 runs the coordinator (a small service that the others connect to
at ``--coordinator-address``) inside itself. On CPUs the processes exchange gradients through Gloo (XLA's CPU
collectives), on GPUs/TPUs through the accelerators' own links. See docs/several-processes.md.

    add_flags(parser)          # --coordinator-address, --num-processes, --process-id
    args = parser.parse_args()
    init_distributed(args)     # before anything touches a device
"""

from __future__ import annotations

import argparse
import textwrap

from delib_jax._command import UsageError


def add_flags(parser: argparse.ArgumentParser, what: str = "the work") -> None:
    """Add the multi-host flags to ``parser`` (their own group); ``what`` says how the processes share."""
    text = (
        f"Start the same command once per process (on one or several hosts), each with its own --process-id; {what}. "
        "See docs/several-processes.md."
    )
    group = parser.add_argument_group("several processes (jax.distributed; omit for one process)", textwrap.fill(text))
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="where process 0 listens for the others (a free port on process 0's host)")  # fmt: skip
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's number, 0 .. N-1")


def init_distributed(args: argparse.Namespace) -> bool:
    """``jax.distributed.initialize`` when (and only when) the multi-host flags are given, all three of them; returns
    whether it did. Call it before anything touches a device. `UsageError` for incomplete or inconsistent flags."""
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if all(f is None for f in flags):
        return False
    if any(f is None for f in flags):
        raise UsageError("several processes need all of --coordinator-address, --num-processes and --process-id")
    if args.num_processes < 1:
        raise UsageError(f"--num-processes must be at least 1, got {args.num_processes}")
    if not 0 <= args.process_id < args.num_processes:
        raise UsageError(f"--process-id must lie in 0 .. {args.num_processes - 1}, got {args.process_id}")
    host, _, port = args.coordinator_address.rpartition(":")
    if not host or not port.isdecimal() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator-address must be HOST:PORT, got {args.coordinator_address!r}")
    import jax

    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    return True


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing to wait for with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__ = ["add_flags", "barrier", "init_distributed"]
