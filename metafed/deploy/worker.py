"""A warm ClientApp worker: one long-lived process that serves every message a SuperNode
receives (``metafed node``), instead of Flower's default of one fresh process per message.

Flower 1.42's SuperNode started with ``--isolation process`` launches nothing itself: it
queues each task on its Runtime API (``--port``, 127.0.0.1 by default) for any process to
claim with ``AcquireTask`` and a per-task token. Flower's own ``flower-superexec`` claims a
task and starts ``flwr-clientapp`` for it, which imports flwr, torch and metafed and rebuilds
the node's data: about 80 % of a deployed round's CPU (issue 22). This worker claims the
tasks itself and runs each one in-process, with the same steps ``flwr-clientapp`` takes
(pull the message, context and app bundle; run the ClientApp; push the reply and the
context), so a node imports once, keeps its loaded partition and model, and reuses one
HTTP connection to its SuperNode.

What it does not change: the ClientApp, its handlers and the node's own policy are the
ones ``flwr-clientapp`` runs (the context, with the node config, comes from the SuperNode
every task), so results are identical; a task that raises is replied as a Flower error and
the worker goes on. The Runtime API listens on loopback: the worker and its SuperNode are
one party's processes on one machine."""
from __future__ import annotations

import argparse
import logging
import queue
import signal
import threading
import time

from metafed.deploy.served_app import METAFED_CLIENT_APP

log = logging.getLogger("metafed.deploy.worker")
FAST_POLL = 0.01  # seconds between checks for a task right after one


class Worker:
    """Claims ClientApp tasks from one SuperNode's Runtime API and serves them in-process.

    Each claimed task's message is pulled in a thread of its own, with its own token; the
    ClientApp then runs on the main thread, one task at a time (the node's state files and
    caches have one writer). A task whose message never arrives (its run died while the
    SuperNode was fetching it) waits in its thread, so it cannot stop the worker serving the
    next run."""

    def __init__(self, runtime_api_address: str, poll_interval: float = 0.1,
                 allowed: tuple[str, ...] = (METAFED_CLIENT_APP,)):
        self.address, self.poll_interval, self.allowed = runtime_api_address, poll_interval, tuple(allowed)
        self.client = self._runtime_client(None)  # the claiming loop's one connection
        self.ready: queue.Queue[_Task] = queue.Queue()  # tasks whose message arrived, for the main thread
        self.served = 0
        self.tasks: list[threading.Thread] = []
        self.stopping = threading.Event()

    def _runtime_client(self, token: str | None):
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(server_address=self.address, insecure=True,
                                                     root_certificates=None, interceptors=interceptors,
                                                     retry_invoker=make_simple_http_retry_invoker())

    def acquire(self) -> str | None:
        """The token of a waiting ClientApp task, claimed; None when none waits."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
        return res.token if res.HasField("task") and res.token else None

    def client_app(self, fab):
        """The ClientApp this node serves for the run's app bundle: one its operator allows,
        imported from the node's own packages (:mod:`metafed.deploy.served_app`); the
        bundle's code is never installed or imported."""
        from metafed.deploy.served_app import served_client_app

        return served_client_app(fab.content, self.allowed)

    def fetch(self, token: str) -> None:
        """In a task's own thread: pull its message, context and app bundle, then queue it for
        the main thread (PyTorch runs far slower in a fresh thread: 1.7 s against 0.05 s for a
        small training task here)."""
        from flwr.common.constant import SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_task_output

        task = _Task(time.perf_counter(), self._runtime_client(token))
        task.beat = HeartbeatSender(lambda: self._heartbeat(task.client))
        task.beat.start()
        try:
            # Flower's own steps; its parts are polled every 10-100 ms (shorten_object_pulls in main)
            task.message, task.context, task.run, task.fab = pull_task_input(task.client)
        except Exception as ex:  # no message to answer: the task fails, the worker goes on
            log.exception("could not pull the task's message")
            try:
                push_task_output(task.client, task.context, SubStatus.FAILED, f"{type(ex)}:<'{ex}'>")
            finally:
                task.close()
            return
        self.ready.put(task)

    def finish(self, task: "_Task") -> None:
        """On the main thread: run the ClientApp on the task's message, push the reply and the
        context, as ``flwr-clientapp`` does (an exception is replied as a Flower error)."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        from metafed.deploy.served_app import ClientAppRefused

        reply, status, details = None, SubStatus.FAILED, "ClientApp task failed"
        try:
            reply = self.client_app(task.fab)(message=task.message, context=task.context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, (LoadClientAppError, ClientAppRefused)) \
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(ex)}:<'{ex}'>"
            log.exception("the ClientApp raised")
            reply = Message(Error(code=code, reason=details), reply_to=task.message)
        finally:
            try:
                push_message(task.client, reply, task.context)
            finally:
                push_task_output(task.client, task.context, status, details)
                task.close()
                self.served += 1
                log.info("served a %s message in %.3f s (%s)", task.message.metadata.message_type,
                         time.perf_counter() - task.started, status)

    @staticmethod
    def _heartbeat(client) -> bool:
        """The task's heartbeat (Flower's own raises SIGINT on a refused one: that would end
        this worker, not the task)."""
        import httpx
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        return True

    def run(self) -> None:
        """Serve tasks until stopped; an unreachable SuperNode is waited for (it may be
        starting, or restarting)."""
        import httpx

        claimed, interval, last_task = 0, FAST_POLL, 0.0
        while not self.stopping.is_set():
            try:
                token = self.acquire()
            except (httpx.TransportError, httpx.HTTPStatusError):
                token = None
                self.stopping.wait(0.5)
            if token:
                claimed += 1
                last_task = time.monotonic()
                task = threading.Thread(target=self.fetch, args=(token,), daemon=True, name=f"task-{claimed}")
                task.start()
                self.tasks = [t for t in self.tasks if t.is_alive()] + [task]
                if len(self.tasks) > 2:
                    log.warning("%d tasks in flight: %d wait for a message that has not arrived",
                                len(self.tasks), len(self.tasks) - 1)
            # fast right after a task (the next stage or the evaluation often follows at once), then
            # backing off to poll_interval: every check is a request the SuperNode serves, and ten
            # idle nodes checking every 20 ms took most of a 2-core machine
            interval = FAST_POLL if time.monotonic() - last_task < 1.0 else min(self.poll_interval, interval * 1.5)
            try:
                self.finish(self.ready.get(timeout=interval))  # wakes as soon as a message is in
                last_task = time.monotonic()
            except queue.Empty:
                pass
        self.client.close()


class _Task:
    """One claimed task: its Runtime API client (with the task's token), heartbeat and input."""

    def __init__(self, started: float, client):
        self.started, self.client = started, client
        self.beat = self.message = self.context = self.run = self.fab = None

    def close(self) -> None:
        if self.beat is not None and self.beat.is_running:
            self.beat.stop()
        self.client.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m metafed.deploy.worker --runtime-api-address 127.0.0.1:PORT``."""
    parser = argparse.ArgumentParser(description="metafed's warm ClientApp worker for one SuperNode")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--poll-interval", type=float, default=0.1, help="longest wait between checks for a task")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--client-app", action="append", default=[],
                        help="a ClientApp this node serves (module:attribute); metafed's own by default")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API request otherwise
    if args.parent_pid is not None:  # a killed `metafed node` leaves no worker behind
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # kill -USR1 prints where the worker is (a stuck task)
    from metafed.deploy.supernode_polls import shorten_object_pulls

    shorten_object_pulls()
    worker = Worker(args.runtime_api_address, args.poll_interval,
                    tuple(args.client_app) or (METAFED_CLIENT_APP,))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stopping.set())
    # importing torch and metafed's client side now, not on the first message, keeps the first
    # round as fast as the others
    import metafed.deploy.client_app  # noqa: F401  (its import time paid now)

    log.info("serving ClientApp tasks of the SuperNode at %s", args.runtime_api_address)
    worker.run()
    log.info("stopped after %d tasks", worker.served)


if __name__ == "__main__":
    main()
