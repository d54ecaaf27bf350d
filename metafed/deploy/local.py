"""``metafed deploy-local``: a real Flower deployment on this machine, for one run.

It starts a SuperLink and N SuperNodes as separate processes on 127.0.0.1 (each SuperNode
holding one data partition, given by ``--node-config``), submits metafed's Flower app with
``flwr run``, streams its log, and tears everything down. By default the links use TLS with
a throwaway CA made for the run (``--insecure`` turns TLS off, loopback only). The run folder
is the same as ``metafed run`` writes, committed by the ServerApp after every round."""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from metafed.config import ConfigError, RunConfig
from metafed.deploy.identity import make_identities
from metafed.deploy.warm_node import free_port
from metafed.run import check_deployable
from metafed.run_folder import check_target

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "metafed-app"
version = "1.0.0"
description = "metafed on Flower's deployment engine"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "metafed"

[tool.flwr.app.components]
serverapp = "metafed.deploy.server_app:app"
clientapp = "metafed.deploy.client_app:app"

[tool.flwr.app.config]
config-file = ""
out = ""
num-nodes = 1
resume = false
round-timeout = 300.0
connect-timeout = 60.0
secagg-roster = ""
"""


class DeployError(RuntimeError):
    """The local deployment could not start or its run did not finish."""


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"{what} exited with code {proc.returncode} while starting")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def make_tls(folder: Path, addresses: tuple[str, ...] = ()) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost and ``addresses``
    (valid one day). A SuperLink's certificate must name 127.0.0.1 even when the parties
    reach it at another address: its own executor connects to it there."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    folder.mkdir(parents=True, exist_ok=True)

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("metafed deploy-local CA")).issuer_name(name("metafed deploy-local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(a))
                                                                    for a in ("127.0.0.1", *addresses))])
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    os.chmod(paths["key"], 0o600)
    return paths


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (ECDSA P-384, OpenSSH format as Flower reads it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


def operator_policy(cfg: RunConfig) -> dict[str, str]:
    """The node policy keys deploy-local gives its nodes: one operator runs every node here,
    so the nodes agree to what this run asks of them (label counts, the insecure reproducible
    mode of tests, its adaptation budget). Separate parties set their own (docs/deploy.md)."""
    policy = {}
    if cfg.insecure_reproducible_privacy:
        policy["allow-insecure-reproducible-privacy"] = "true"
    if cfg.aggregator == "attention" and cfg.attention_score == "labels":
        policy["share-label-counts"] = "true"
    if cfg.personalize_steps > 100:
        policy["max-personalize-steps"] = str(cfg.personalize_steps)
    return policy


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DeployError(f"{name} not found beside {sys.executable}: install the deploy extra "
                          '(pip install "metafed[deploy]")')
    return str(path)


class LocalDeployment:
    """The processes of one local deployment; a context manager that always tears them down."""

    def __init__(self, clients: int, cfg: RunConfig, work: Path, insecure: bool, persistent: bool = False,
                 warm: bool = True, idle_poll: float | None = None, node_extra: dict[int, str] | None = None):
        self.clients, self.cfg, self.work, self.insecure = clients, cfg, work, insecure
        self.warm = warm  # nodes as `metafed node` (one worker each), else Flower's process per message
        self.idle_poll = idle_poll  # warm nodes' --idle-poll (None: metafed node's default)
        self.node_extra = dict(node_extra or {})  # node -> more of its node config (its own policy)
        self.persistent = persistent  # SuperLink state in a database file (survives a SuperLink restart)
        self._roles: dict[int, tuple[str, int]] | None = None  # partition -> (role, index), under --heldout-fraction
        self.procs: list[subprocess.Popen] = []
        # the SuperLink and SuperNodes start Flower's own tools (flower-superexec) by name: the
        # interpreter's folder goes first on PATH, so a virtualenv that is not activated works too
        bin_dir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "FLWR_HOME": str(work / "flwr-home"), "PYTHONUNBUFFERED": "1",
                    "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
        # N nodes share this machine's cores: each node's PyTorch gets its share (unless set),
        # or their thread pools oversubscribe the cores (3 nodes on 2 cores: rounds 2x slower)
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, clients))))
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.logs / log_name, "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> "LocalDeployment":
        try:
            return self._start()
        except BaseException:  # a failed start leaks nothing: what did start is torn down
            self.__exit__(None, None, None)
            raise

    def _start(self) -> "LocalDeployment":
        self.port = free_port()
        self.tls = None if self.insecure else make_tls(self.work / "tls")
        self.start_superlink()
        home = self.work / "flwr-home"
        home.mkdir(exist_ok=True)
        connection = f'address = "127.0.0.1:{self.port}"\n' + \
            ("insecure = true\n" if self.insecure else f'root-certificates = "{self.tls["ca"]}"\n')
        (home / "config.toml").write_text(f'[superlink]\ndefault = "metafed"\n\n[superlink.metafed]\n{connection}')
        # trusted set-up, for every run: one identity per client, made here, not by the server; it
        # binds each client id to its node at registration (and keys secure aggregation)
        self.roster, self.identity_keys = make_identities(self.work / "secagg", self.clients)
        for i in range(self.clients):
            self.start_node(i)
        return self

    def start_superlink(self) -> subprocess.Popen:
        """The SuperLink. With ``persistent``, its state lives in a database file, so that a
        restarted SuperLink keeps the registered SuperNode keys and runs (Flower 1.42 keeps it
        in SQLite, whose single writer lock fails under heavy concurrent pushes: 10 nodes
        sending 26 MB each hit "database is locked" here, so the default is in memory).
        SuperNode authentication needs TLS in Flower: on whenever TLS is."""
        tls = self.tls
        security = ["--insecure"] if self.insecure else \
            ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]),
             "--enable-supernode-auth"]
        self.superlink = self._spawn([_tool("flower-superlink"), *security, "--disable-runtime-dependency-installation",
                                      *(["--database", str(self.work / "superlink.db")] if self.persistent else []),
                                      "--host", "127.0.0.1", "--port", str(self.port)], "superlink.log")
        _wait_for_port(self.port, self.superlink, 60, "the SuperLink")
        return self.superlink

    def node_security(self, name: str, register: bool = True) -> list[str]:
        """TLS root and, with TLS, an authentication key registered with the SuperLink's
        allow-list (``register=False``: a key the SuperLink has never seen)."""
        if self.insecure:
            return ["--insecure"]
        private, public = make_node_keys(self.work / "node-keys", name)
        if register:
            done = subprocess.run([_tool("flwr"), "supernode", "register", str(public), "metafed"], env=self.env,
                                  capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise DeployError(f"could not register SuperNode {name}: {(done.stdout + done.stderr)[-500:]}")
        return ["--root-certificates", str(self.tls["ca"]), "--auth-supernode-private-key", str(private)]

    def _identity_of_partition(self, partition: int, parts: int) -> Path | None:
        """The identity key of the training client a partition holds (the roster is keyed by
        training client id, which differs from the partition under --heldout-fraction);
        None for a held-out partition, which never trains."""
        if self.roster is None:
            return None
        if self.cfg.heldout_fraction == 0 or parts != self.cfg.num_clients:
            return self.identity_keys[partition]
        if self._roles is None:
            from metafed.data import load_dataset

            fed = load_dataset(self.cfg)
            self._roles = {p: fed.role_of_partition(p) for p in range(parts)}
        role, index = self._roles[partition]
        return self.identity_keys[index] if role == "train" else None

    def start_node(self, i: int, register: bool = True, partitions: int | None = None) -> subprocess.Popen:
        parts = partitions or self.clients
        extra = self.node_extra.get(i, "")
        node_config = f'dataset="{self.cfg.dataset}" partition-id={i % parts} num-partitions={parts}'  # TOML values
        if "state-dir=" not in extra:
            node_config += f" state-dir='{self.work / f'node-{i}'}'"
        key = self._identity_of_partition(i % parts, parts)
        if key is not None:  # under secure aggregation the key also makes the node require it
            name = "secagg-key" if self.cfg.secure_aggregation else "identity-key"
            node_config += f" {name}='{key}' secagg-roster='{self.roster}'"
        node_config += "".join(f" {key}={value}" for key, value in operator_policy(self.cfg).items())
        if extra:
            node_config += " " + extra
        launcher = [_tool("metafed"), "node", *(["--idle-poll", str(self.idle_poll)] if self.idle_poll else [])] \
            if self.warm else [_tool("flower-supernode")]
        return self._spawn([*launcher, *self.node_security(f"node-{i}", register),
                            "--superlink", f"127.0.0.1:{self.port}", "--node-config", node_config,
                            "--port", str(free_port())], f"supernode-{i}.log")

    def submit(self, out: Path, resume: bool, round_timeout: float, echo=print, timeout: float = 1800.0,
               connect_timeout: float = 60.0) -> int:
        """Submit metafed's app for ``self.cfg``; returns ``flwr run``'s exit code. The run
        starts once all ``self.clients`` SuperNodes answered, within ``connect_timeout`` s."""
        app = self.work / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(APP_PYPROJECT)
        config_file = self.work / "run-config.json"
        config_file.write_text(self.cfg.model_dump_json())
        run_config = (f"config-file='{config_file}' out='{out.resolve()}' num-nodes={self.clients} "
                      f"resume={'true' if resume else 'false'} round-timeout={round_timeout} "
                      f"connect-timeout={connect_timeout}")
        if self.roster is not None:
            run_config += f" secagg-roster='{self.roster}'"
        return self.submit_app(app, run_config, echo, timeout)

    def submit_app(self, app: Path, run_config: str, echo=print, timeout: float = 1800.0) -> int:
        """``flwr run APP --stream`` on this deployment (any Flower app folder); streams its
        log to ``echo``; killed after ``timeout`` seconds."""
        proc = subprocess.Popen([_tool("flwr"), "run", str(app), "metafed", "--stream", "--run-config", run_config],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, text=True)
        self.procs.append(proc)
        watchdog = threading.Timer(timeout, proc.kill)  # bounded: a stuck run is killed, then torn down
        watchdog.start()
        try:
            for line in proc.stdout:
                echo(line.rstrip())
            return proc.wait()
        finally:
            watchdog.cancel()

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
                proc.wait()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that every process started is torn down."""


@contextlib.contextmanager
def _terminated_as_interrupt():
    """While a deployment runs, SIGTERM unwinds like Ctrl-C (SIGINT) does: the context
    managers tear the SuperLink, the SuperNodes and their executors down (each runs in a
    process group of its own, which a signal to this process alone would orphan)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def deploy_local(cfg: RunConfig, clients: int, out: Path, insecure: bool = False, overwrite: bool = False,
                 resume: bool = False, timeout: float = 1800.0, round_timeout: float = 300.0, echo=print,
                 warm: bool = True) -> Path:
    """Run ``cfg`` on a local SuperLink with ``clients`` SuperNodes; returns the run folder."""
    if clients < 1:
        raise ConfigError("--clients must be at least 1")
    if cfg.dataset not in ("digits", "mnist", "synthetic"):
        raise ConfigError(f"deploy-local partitions a built-in pooled dataset (digits, mnist, synthetic), not "
                          f"{cfg.dataset!r}")
    check_deployable(cfg)
    cfg = cfg.updated(num_clients=clients, out=out, progress=False, backend="loop")
    RunConfig(**json.loads(cfg.model_dump_json()))  # re-validate with the node count
    if not resume:
        check_target(out, overwrite)
    with tempfile.TemporaryDirectory(prefix="metafed-deploy-") as tmp, _terminated_as_interrupt():
        work = Path(tmp)
        with LocalDeployment(clients, cfg, work, insecure, warm=warm) as deployment:
            code = deployment.submit(out, resume, round_timeout, echo, timeout)
        if code != 0 or not (out / "summary.json").exists():
            logs = "\n".join((work / "logs" / f).read_text(errors="replace")[-2000:]
                             for f in sorted(os.listdir(work / "logs")))
            raise DeployError(f"the deployed run did not finish (flwr run exit code {code}); last logs:\n{logs}")
    return out
