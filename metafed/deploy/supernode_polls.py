"""Flower's SuperNode with shorter fixed waits (``metafed node --idle-poll``).

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) has two waits
written into its code: with no message waiting at the SuperLink it sleeps 3 s before asking
again, and while its ClientApp works it checks for the reply every 0.5 s. A message thus
waits 1.5 s on average (3 s at worst) before its node sees it, and up to 0.5 s more after
its reply is ready: with a training wave and an evaluation wave, that is most of a
deployed round on small models (docs/benchmarks.md). Flower has no setting for either.

This runs the same ``flower-supernode`` entry point with that module's ``time`` replaced by
one whose ``sleep(3)`` lasts ``idle_poll`` seconds and whose ``sleep(0.5)`` lasts
``reply_poll``. Only the SuperNode's own loop is changed: each idle poll is one small
request to the SuperLink (10 nodes at 0.5 s: 20 a second). On a Flower version whose loop
is not the one this was written against, the waits are left as they are, with a warning."""
from __future__ import annotations

import argparse
import sys
import time
import types

FLOWER_IDLE_SLEEP, FLOWER_REPLY_SLEEP = 3, 0.5  # the literals in Flower 1.42's SuperNode loop


def shortened_time(idle_poll: float, reply_poll: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module: the two fixed waits shortened, the rest as is."""
    def sleep(seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP:
            seconds = idle_poll
        elif seconds == FLOWER_REPLY_SLEEP:
            seconds = reply_poll
        time.sleep(seconds)

    functions = {name: getattr(time, name) for name in dir(time) if not name.startswith("__")}
    return types.SimpleNamespace(**{**functions, "sleep": sleep})


def patch_supernode_waits(idle_poll: float, reply_poll: float) -> bool:
    """Shorten the SuperNode loop's waits; False (nothing changed) on an unknown Flower."""
    import inspect

    import flwr
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    known = (flwr.__version__.startswith("1.42.") and getattr(loop, "time", None) is time
             and source.count(f"time.sleep({FLOWER_IDLE_SLEEP})") == 1)
    if not known:
        return False
    loop.time = shortened_time(idle_poll, reply_poll)
    return True


def shorten_object_pulls(initial_backoff: float = 0.01, backoff_cap: float = 0.1) -> bool:
    """Flower 1.42 fetches a message's parts with ``pull_objects``, which waits 1 s (then 2,
    4 ... up to 10 s) before asking again for a part not yet uploaded; a fast peer asks
    before the sender finished, and every message pays a second. This makes the waits
    10 ms growing to 100 ms in this process (the SuperNode fetching a server's message, the
    warm worker fetching its task's message, the ServerApp fetching a reply); a part is still waited for as long as Flower's
    ``PULL_MAX_TIME`` (2 h). False, and nothing changed, on another Flower version."""
    import flwr
    from flwr.supercore.inflatable import inflatable_utils

    # pull_objects (SuperNode, ServerApp) and pull_and_inflate_object_from_tree (a ClientApp's
    # task input), which passes its own defaults on to pull_objects
    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    keys = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
    if not flwr.__version__.startswith("1.42.") or \
            not all(keys <= set(getattr(f, "__kwdefaults__", None) or {}) for f in functions):
        return False
    for function in functions:
        function.__kwdefaults__.update(initial_backoff=initial_backoff, backoff_cap=backoff_cap,
                                       max_tries_per_object=None)
    return True


def main(argv: list[str] | None = None) -> None:
    """``python -m metafed.deploy.supernode_polls --idle-poll S --reply-poll S -- <flower-supernode flags>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description="flower-supernode with shorter fixed waits")
    parser.add_argument("--idle-poll", type=float, default=float(FLOWER_IDLE_SLEEP))
    parser.add_argument("--reply-poll", type=float, default=FLOWER_REPLY_SLEEP)
    args = parser.parse_args(argv[:split])
    shorten_object_pulls()
    if (args.idle_poll, args.reply_poll) != (FLOWER_IDLE_SLEEP, FLOWER_REPLY_SLEEP) and \
            not patch_supernode_waits(args.idle_poll, args.reply_poll):
        print("metafed node: this Flower version's SuperNode loop is not Flower 1.42's: its idle poll (3 s) "
              "and reply poll (0.5 s) are left as they are", file=sys.stderr)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv[split + 1:]]
    flower_supernode()


if __name__ == "__main__":
    main()
