"""``metafed node``: one party's node, warm. It starts Flower's SuperNode with
``--isolation process`` (so the SuperNode launches no process per message), its fixed
waits shortened (``--idle-poll``, :mod:`metafed.deploy.supernode_polls`), and one
:mod:`metafed.deploy.worker` beside it that serves every message, restarting the worker if
it dies. Every other SuperNode flag passes through unchanged (``--superlink``,
``--node-config`` with the node's policy, TLS roots, the authentication key).

The SuperNode's Runtime API (where the worker claims its tasks) is bound to 127.0.0.1 on a
free port unless ``--port`` is given: it is the node's own, never exposed."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


class NodeArgsError(ValueError):
    """A SuperNode flag that a warm node cannot honour."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supernode_command(args: list[str], idle_poll: float = 0.5, reply_poll: float = 0.02) -> tuple[list[str], str]:
    """The SuperNode's command line for ``args`` under process isolation, with its fixed
    waits shortened (:mod:`metafed.deploy.supernode_polls`), and the Runtime API address its
    worker connects to."""
    args = list(args)
    if "--isolation" in args:
        i = args.index("--isolation")
        if i + 1 < len(args) and args[i + 1] != "process":
            raise NodeArgsError(f"metafed node runs its own worker: --isolation {args[i + 1]} is not possible "
                                "(run flower-supernode directly for Flower's subprocess isolation)")
        del args[i:i + 2]
    if "--host" in args:
        raise NodeArgsError("metafed node keeps the Runtime API on 127.0.0.1: --host is not possible")
    if "--port" in args:
        port = args[args.index("--port") + 1]
    else:
        port = str(free_port())
        args += ["--port", port]
    if idle_poll <= 0 or reply_poll <= 0:
        raise NodeArgsError(f"the SuperNode's polls must be positive (seconds), not idle {idle_poll} and "
                            f"reply {reply_poll}")
    return [sys.executable, "-m", "metafed.deploy.supernode_polls", "--idle-poll", str(idle_poll),
            "--reply-poll", str(reply_poll), "--", "--isolation", "process", *args], f"127.0.0.1:{port}"


def run_node(args: list[str], poll_interval: float = 0.1, echo=print, idle_poll: float = 0.5,
             reply_poll: float = 0.02, client_apps: tuple[str, ...] = ()) -> int:
    """Run the SuperNode and its worker until the SuperNode exits or this process is
    signalled; returns the SuperNode's exit code (0 when stopped by a signal)."""
    command, runtime = supernode_command(args, idle_poll, reply_poll)
    supernode = subprocess.Popen(command)
    worker_cmd = [sys.executable, "-m", "metafed.deploy.worker", "--runtime-api-address", runtime,
                  "--poll-interval", str(poll_interval), "--parent-pid", str(os.getpid()),
                  *(arg for ref in client_apps for arg in ("--client-app", ref))]
    stop = {"signal": None}

    def stopping(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, stopping) for s in (signal.SIGTERM, signal.SIGINT)}
    worker = subprocess.Popen(worker_cmd)
    restarts = 0
    try:
        while stop["signal"] is None and supernode.poll() is None:
            if worker.poll() is not None:  # the worker died: its SuperNode's tasks need a new one
                restarts += 1
                echo(f"metafed node: the worker exited with code {worker.returncode}; restarting it "
                     f"(restart {restarts})")
                time.sleep(min(5.0, 0.5 * restarts))
                worker = subprocess.Popen(worker_cmd)
            time.sleep(0.2)
    finally:
        for proc in (worker, supernode):
            if proc.poll() is None:
                proc.terminate()
        for proc in (worker, supernode):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if stop["signal"] is not None else int(supernode.returncode or 0)
