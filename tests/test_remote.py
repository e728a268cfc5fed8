"""The remote backend: the cloud in this process, each edge a process of its own that dials it over
gRPC on loopback, with TLS (a test CA made here with openssl) and a token."""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from processes import children

from hier_jax import flags, train
from hier_jax.config import ExperimentConfig
from hier_jax.errors import UserError
from hier_jax.models import ExitHeadConfig

grpc = pytest.importorskip("grpc", reason="the remote backend needs the remote extra (grpcio)")

from hier_jax.remote import launch, transport  # noqa: E402
from hier_jax.remote.config import CloudConfig, EdgeConfig, Security, edge_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
CONFIG = ExperimentConfig(
    model="resnet18_tv",
    dataset="digits",
    split="layer1_1",
    bits=4,
    width=4,
    batch_size=32,
    max_steps=6,
    head=ExitHeadConfig(channels=8),
    queue_size=1,
    precision="fp32",
    backend="remote",
    timeout_s=120.0,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, the cloud's certificate for 127.0.0.1 and an edge's (for mutual TLS), and a second CA."""
    from hier_jax.bench.pki import make_pki

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    make_pki(d, certs=("cloud", "edge"), cas=("ca", "other_ca"))
    return d


def edge_argv(config: ExperimentConfig, edge: int, port: int, pki: Path, ca: str = "ca.pem") -> list[str]:
    return edge_command(config, f"127.0.0.1:{port}", "--edge", str(edge), "--tls-ca", str(pki / ca))


def start_edge(argv: list[str], token: str = TOKEN) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", transport.TOKEN_ENV: token}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(autouse=True)
def nothing_outlives_the_test():
    """No edge or cloud process, no listening port and no thread of the network a test started is left
    once it ends (the ports: nothing listens on one the test's servers took)."""
    import threading
    import time

    before, threads_before = children(), set(threading.enumerate())
    taken: list[int] = []
    free_port = transport.free_port

    def tracked() -> int:
        taken.append(free_port())
        return taken[-1]

    transport.free_port = tracked
    try:
        yield
    finally:
        transport.free_port = free_port
    deadline = time.monotonic() + 15
    while True:
        processes = children() - before
        threads = [t.name for t in set(threading.enumerate()) - threads_before if t.name.startswith("hier-")]
        listening = [port for port in taken if _listening(port)]
        if not (processes or threads or listening) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not processes and not threads and not listening, (processes, threads, listening)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv(transport.TOKEN_ENV, TOKEN)


def cloud_config(port: int, pki: Path) -> CloudConfig:
    return CloudConfig(listen=f"127.0.0.1:{port}", tls_cert=str(pki / "cloud.pem"), tls_key=str(pki / "cloud.key"))


@pytest.mark.slow
def test_one_edge_over_tls_with_a_token_equals_the_in_process_sequential_run(pki, token, digits):
    port = transport.free_port()
    edge = start_edge(edge_argv(CONFIG, 0, port, pki))
    try:
        remote = launch.run(CONFIG, digits, cloud_config(port, pki), evaluate=True)
        _, stderr = edge.communicate(timeout=120)
    finally:
        edge.kill()
    assert edge.returncode == 0, stderr
    setup = train.build(dataclasses.replace(CONFIG, backend="threads"), digits)
    local = train.train(setup, schedule="sequential", progress=False, evaluate=True)
    assert remote.cloud_order == [(0, t) for t in range(6)]
    assert remote.cloud_losses == local.cloud_losses  # bit for bit
    assert [e["loss"] for e in remote.record.edges] == [e["loss"] for e in local.record.edges]
    assert (remote.edges[0].edge_accuracy, remote.edges[0].cloud_accuracy) == (
        local.edges[0].edge_accuracy,
        local.edges[0].cloud_accuracy,
    )
    for a, b in zip(jax.tree.leaves(remote.cloud_state), jax.tree.leaves(local.cloud_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "done: " in stderr and " B up, " in stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, cloud_words, edge_words",
    [
        ({"token": "wrong"}, "is not this cloud's", "refused this edge's HIER_JAX_TOKEN"),
        ({"ca": "other_ca.pem"}, None, "presents a certificate --tls-ca does not accept"),
        ({"bits": 8}, "differs in --bits (4 here, 8 on the edge)", "differs in --bits (4 here, 8 on the edge)"),
    ],
    ids=["token", "ca", "bits"],
)
def test_a_misconfigured_edge_is_refused_with_one_line_on_each_side(
    pki, token, digits, change, cloud_words, edge_words
):
    port = transport.free_port()
    config = dataclasses.replace(CONFIG, bits=change.get("bits", CONFIG.bits), timeout_s=20.0)
    edge = start_edge(edge_argv(config, 0, port, pki, ca=change.get("ca", "ca.pem")), token=change.get("token", TOKEN))
    logged: list[str] = []
    try:
        with pytest.raises(Exception, match="no edge connected within"):
            launch.run(dataclasses.replace(CONFIG, timeout_s=20.0), digits, cloud_config(port, pki), log=logged.append)
        _, stderr = edge.communicate(timeout=60)
    finally:
        edge.kill()
    last = stderr.strip().splitlines()[-1]
    assert edge.returncode == 2 and edge_words in last and "Traceback" not in stderr, stderr
    if cloud_words:
        assert any(cloud_words in line for line in logged), logged


def test_plaintext_is_refused_off_loopback_and_tls_needs_its_files(tmp_path):
    with pytest.raises(UserError, match="only to a loopback address, not 10.0.0.1"):
        Security(insecure=True).check("10.0.0.1", "edge")
    Security(insecure=True).check("127.0.0.1", "edge")  # loopback: allowed
    with pytest.raises(UserError, match="the cloud needs --tls-cert and --tls-key"):
        Security().check("0.0.0.0", "cloud")
    with pytest.raises(UserError, match="the edge needs --tls-ca"):
        Security().check("10.0.0.1", "edge")
    with pytest.raises(UserError, match="--tls-ca .* is not a file"):
        Security(ca=str(tmp_path / "missing.pem")).check("10.0.0.1", "edge")
    with pytest.raises(UserError, match="--connect 'nohost' is invalid; valid: HOST:PORT"):
        transport.split_address("nohost", "--connect")


def test_the_token_comes_from_the_environment_only(monkeypatch):
    monkeypatch.delenv(transport.TOKEN_ENV, raising=False)
    with pytest.raises(UserError, match="set HIER_JAX_TOKEN"):
        transport.token()
    assert "token" not in {f.name for f in dataclasses.fields(CloudConfig)} | {
        f.name for f in dataclasses.fields(EdgeConfig)
    }


@pytest.mark.slow
def test_two_edges_in_round_robin_equal_the_thread_backend(pki, token, digits):
    config = dataclasses.replace(CONFIG, edges=2, max_steps=3)
    port = transport.free_port()
    edges = [start_edge(edge_argv(config, e, port, pki)) for e in (1, 0)]  # the order they dial in is theirs
    try:
        remote = launch.run(config, digits, cloud_config(port, pki), evaluate=True)
        outcomes = [edge.communicate(timeout=120) for edge in edges]
    finally:
        for edge in edges:
            edge.kill()
    assert [edge.returncode for edge in edges] == [0, 0], outcomes
    local = train.train(
        train.build(dataclasses.replace(config, backend="threads"), digits), progress=False, evaluate=True
    )
    assert remote.cloud_order == local.cloud_order == [(e, t) for t in range(3) for e in range(2)]
    assert remote.cloud_losses == local.cloud_losses
    assert [(e.edge_accuracy, e.cloud_accuracy) for e in remote.edges] == [
        (e.edge_accuracy, e.cloud_accuracy) for e in local.edges
    ]


def test_network_flags_need_the_remote_backend(capsys):
    from experiments import train as train_experiment

    with pytest.raises(SystemExit) as exited:
        train_experiment.main(["--dataset", "digits", "--listen", "127.0.0.1:1"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and "--listen is the network's: it needs --backend remote" in line


@pytest.mark.slow
def test_an_edge_killed_mid_run_and_started_again_ends_as_the_fault_free_run(pki, token, digits, tmp_path):
    """Its connection ends, the scheduler restarts it: the next process to dial in as edge 0 finds the
    state of the last checkpoint in its own --checkpoints directory (the cloud sends none), replays up
    to the first step the cloud has not trained on without sending it, and goes on."""
    import threading

    config = dataclasses.replace(CONFIG, max_restarts=1, max_steps=8, checkpoint_every=2)
    port = transport.free_port()
    own = ["--checkpoints", str(tmp_path / "own")]
    first = start_edge(edge_argv(dataclasses.replace(config, kill_edges=((0, 4),)), 0, port, pki) + own)
    processes = [first]

    def start_again():
        first.wait(120)
        processes.append(start_edge(edge_argv(config, 0, port, pki) + own))

    again = threading.Thread(target=start_again)
    again.start()
    logged: list[str] = []
    try:
        remote = launch.run(config, digits, cloud_config(port, pki), evaluate=True, checkpoint_dir=tmp_path / "ckpt",
                            log=logged.append)  # fmt: skip
        again.join(120)
        _, stderr = processes[-1].communicate(timeout=120)
    finally:
        for process in processes:
            process.kill()
    assert any("edge 0 continues from its own checkpoint of step" in line for line in logged), logged
    assert "from its own checkpoint of step" in stderr, stderr
    assert first.returncode == 1 and processes[-1].returncode == 0
    local = train.train(
        train.build(dataclasses.replace(config, backend="threads"), digits),
        schedule="sequential",
        progress=False,
        evaluate=True,
    )
    report = remote.edges[0]
    assert report.restarts == 1 and not report.lost and report.delivered == 8
    assert remote.cloud_losses == local.cloud_losses
    assert (report.edge_accuracy, report.cloud_accuracy) == (
        local.edges[0].edge_accuracy,
        local.edges[0].cloud_accuracy,
    )


def run_cli(main, argv, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def test_the_edge_command_refuses_a_bad_set_up_in_one_line_before_any_data(token, capsys, monkeypatch):
    from experiments import edge

    def forbidden(*args, **kwargs):
        raise AssertionError("loaded data before checking the set-up")

    monkeypatch.setattr(edge, "load_dataset", forbidden)
    for argv, words in (
        (["--connect", "10.1.2.3:50051", "--insecure"], "only to a loopback address, not 10.1.2.3"),
        (["--connect", "cloud:50051"], "the edge needs --tls-ca"),
        (["--connect", "cloud"], "--connect 'cloud' is invalid; valid: HOST:PORT"),
        (["--connect", "127.0.0.1:1", "--insecure", "--edges", "2", "--edge", "2"], "--edge 2 is invalid"),
    ):
        code, lines = run_cli(edge.main, ["--dataset", "digits", *argv], capsys)
        assert code == 2 and len(lines) == 1 and words in lines[0], (argv, lines)
    monkeypatch.delenv(transport.TOKEN_ENV)
    code, lines = run_cli(edge.main, ["--dataset", "digits", "--insecure"], capsys)
    assert code == 2 and "set HIER_JAX_TOKEN" in lines[-1]


@pytest.mark.slow
def test_a_cloud_no_edge_reaches_stops_with_one_line_within_its_timeout(token, capsys, tmp_path):
    from experiments import cloud

    port = transport.free_port()
    argv = ["--dataset", "digits", "--model", "resnet18_tv", "--width", "4", "--split", "layer1_1",
            "--batch-size", "32", "--max-steps", "2", "--listen", f"127.0.0.1:{port}", "--insecure",
            "--timeout", "3", "--out", str(tmp_path / "run")]  # fmt: skip
    code, lines = run_cli(cloud.main, argv, capsys)
    assert code == 1 and "no edge connected within 3 s" in lines[-1] and "Traceback" not in "\n".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["split_learning", "end_to_end"])
def test_the_baselines_over_the_network_equal_them_in_process(pki, token, digits, scheme):
    """Split learning sends features up and their gradient down every step; end-to-end sends the batch."""
    config = dataclasses.replace(CONFIG, scheme=scheme, max_steps=3)
    port = transport.free_port()
    edge = start_edge(edge_argv(config, 0, port, pki))
    try:
        remote = launch.run(config, digits, cloud_config(port, pki), evaluate=True)
        _, stderr = edge.communicate(timeout=120)
    finally:
        edge.kill()
    assert edge.returncode == 0, stderr
    local = train.train(train.build(dataclasses.replace(config, backend="threads"), digits), schedule="sequential",
                        progress=False, evaluate=True)  # fmt: skip
    assert remote.cloud_losses == local.cloud_losses
    assert remote.edges[0].cloud_accuracy == local.edges[0].cloud_accuracy


@pytest.mark.slow
def test_mutual_tls_takes_an_edge_with_a_certificate_and_refuses_one_without(pki, token, digits):
    config = dataclasses.replace(CONFIG, max_steps=2, timeout_s=30.0)
    port = transport.free_port()
    mutual = dataclasses.replace(cloud_config(port, pki), tls_ca=str(pki / "ca.pem"))
    bare = start_edge(edge_argv(config, 0, port, pki))  # no client certificate: the handshake fails
    with_cert = edge_argv(config, 0, port, pki) + [
        "--tls-cert",
        str(pki / "edge.pem"),
        "--tls-key",
        str(pki / "edge.key"),
    ]
    good = start_edge(with_cert)
    try:
        result = launch.run(config, digits, mutual, evaluate=False)
        outcomes = [p.communicate(timeout=120) for p in (good, bare)]
    finally:
        for p in (good, bare):
            p.kill()
    assert good.returncode == 0 and len(result.cloud_order) == 2, outcomes[0]
    last = outcomes[1][1].strip().splitlines()[-1]
    assert bare.returncode == 2 and "asks for a client certificate (mutual TLS: --tls-cert, --tls-key)" in last, last


@pytest.mark.slow
def test_a_run_resumed_over_the_network_from_its_checkpoint_ends_as_the_straight_run(pki, token, digits, tmp_path):
    """The cloud's checkpoint holds the edge's state (flax State, optax named tuples): it must go back
    down the wire with its types, or the edge cannot load it."""
    config = dataclasses.replace(CONFIG, max_steps=6, checkpoint_every=3)
    ckpt = tmp_path / "checkpoints"

    def run(config, **kwargs):
        port = transport.free_port()
        edge = start_edge(edge_argv(config, 0, port, pki))
        try:
            result = launch.run(config, digits, cloud_config(port, pki), evaluate=True, **kwargs)
            _, stderr = edge.communicate(timeout=120)
        finally:
            edge.kill()
        assert edge.returncode == 0, stderr
        return result

    straight = run(config, checkpoint_dir=ckpt)
    shutil.rmtree(ckpt / "6")  # as if it had stopped after step 3's checkpoint
    resumed = run(config, checkpoint_dir=ckpt, resume=True)
    assert resumed.start_step == 3 and resumed.cloud_losses == straight.cloud_losses
    assert (resumed.edges[0].edge_accuracy, resumed.edges[0].cloud_accuracy) == (
        straight.edges[0].edge_accuracy,
        straight.edges[0].cloud_accuracy,
    )


def test_the_cloud_command_refuses_a_bad_network_set_up_in_one_line_before_any_data(token, capsys, monkeypatch):
    from experiments import cloud
    from hier_jax.run import command

    def forbidden(*args, **kwargs):
        raise AssertionError("loaded data before checking the network set-up")

    monkeypatch.setattr(command, "load_dataset", forbidden)
    for argv, words in (
        (["--listen", "nohost"], "--listen 'nohost' is invalid; valid: HOST:PORT"),
        (["--listen", "0.0.0.0:50051"], "the cloud needs --tls-cert and --tls-key"),
        (["--listen", "10.1.2.3:50051", "--insecure"], "only to a loopback address, not 10.1.2.3"),
    ):
        code, lines = run_cli(cloud.main, argv, capsys)
        assert code == 2 and len(lines) == 1 and words in lines[0], (argv, lines)


# --- faults: a link that drops, a cloud that dies, and what the wire refuses -------------------------


class Proxy:
    """A TCP relay on loopback between edges and the cloud that cuts every connection through it
    when told (`cut`); TLS passes through it untouched."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target, self.cuts = target_port, 0
        self.lock, self.sockets = threading.Lock(), []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                edge, _ = self.listener.accept()
            except OSError:  # closed
                return
            try:
                cloud = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                edge.close()
                continue
            with self.lock:
                self.sockets += [edge, cloud]
            for src, dst in ((edge, cloud), (cloud, edge)):
                thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _pump(self, src, dst) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            s.close()

    def cut(self, count: bool = True) -> None:
        import socket

        with self.lock:
            self.cuts += count
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut(count=False)
        for thread in self.threads:
            thread.join(10)


@pytest.mark.slow
def test_an_edge_whose_link_drops_dials_again_and_the_run_ends_as_the_fault_free_one(pki, token, digits, tmp_path):
    """The same edge process, cut off mid-run by the relay: it dials again with backoff, the cloud
    takes it back as a restart and tells it the first step it has not trained on, and the edge
    recomputes from its own checkpoint (no state sent down) up to there without sending again."""
    import threading
    import time

    config = dataclasses.replace(CONFIG, max_restarts=1, max_steps=16, checkpoint_every=4)
    port = transport.free_port()
    proxy = Proxy(port)
    ckpt = tmp_path / "ckpt"

    def cut_after_the_first_checkpoint():
        deadline = time.monotonic() + 120
        while not (ckpt / "4").is_dir() and time.monotonic() < deadline:
            time.sleep(0.005)
        proxy.cut()

    cutter = threading.Thread(target=cut_after_the_first_checkpoint, daemon=True)
    cutter.start()
    edge = start_edge(edge_argv(config, 0, proxy.port, pki))
    logged: list[str] = []
    try:
        remote = launch.run(
            config, digits, cloud_config(port, pki), evaluate=True, checkpoint_dir=ckpt, log=logged.append
        )
        _, stderr = edge.communicate(timeout=120)
    finally:
        edge.kill()
        proxy.close()
        cutter.join(120)
    assert proxy.cuts == 1 and edge.returncode == 0, stderr + "\n".join(logged)
    local = train.train(train.build(dataclasses.replace(config, backend="threads"), digits), schedule="sequential",
                        progress=False, evaluate=True)  # fmt: skip
    report = remote.edges[0]
    assert report.restarts == 1 and report.delivered == 16 and report.dropped == 0
    assert remote.cloud_losses == local.cloud_losses  # bit for bit, as if nothing had happened
    assert (report.edge_accuracy, report.cloud_accuracy) == (
        local.edges[0].edge_accuracy,
        local.edges[0].cloud_accuracy,
    )
    assert "dialling again" in stderr and "connected (again: connection 2)" in stderr, stderr
    assert any("continues from its own checkpoint of step" in line for line in logged), logged
    assert "from its own checkpoint of step" in stderr and "Traceback" not in stderr
    events = [e["event"] for e in remote.network["0"]["connections"]]
    assert events == ["connected", "dropped", "reconnected"], remote.network


@pytest.mark.slow
def test_a_cloud_killed_and_resumed_takes_its_edge_back_and_ends_as_the_straight_run(pki, token, digits, tmp_path):
    """The cloud process dies (SIGKILL) after a checkpoint; the edge keeps dialling; the cloud started
    again with --resume loads the checkpoint, the edge its own state of that step, and the run ends as
    the one nothing happened to."""
    import signal
    import time

    config = dataclasses.replace(CONFIG, max_steps=24, checkpoint_every=4, timeout_s=120.0)
    port = transport.free_port()
    out = tmp_path / "run"
    values = {p: v for p, v, _ in flags.paths(config) if p.split(".")[0] not in ("backend", "timeout_s")}
    cloud_argv = [sys.executable, "-m", "experiments.cloud", *flags.as_argv(ExperimentConfig, values),
                  "--timeout", "120", "--listen", f"127.0.0.1:{port}", "--tls-cert", str(pki / "cloud.pem"),
                  "--tls-key", str(pki / "cloud.key"), "--out", str(out)]  # fmt: skip
    first_cloud = start_edge(cloud_argv)  # the same environment as an edge's
    edge = start_edge(edge_argv(config, 0, port, pki))
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "8").is_dir() and first_cloud.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        first_cloud.send_signal(signal.SIGKILL)
        first_cloud.wait(30)
        assert not (out / "checkpoints" / "24").exists(), "the cloud finished before it was killed"
        resumed = launch.run(config, digits, cloud_config(port, pki), evaluate=True,
                             checkpoint_dir=out / "checkpoints", resume=True)  # fmt: skip
        _, stderr = edge.communicate(timeout=120)
    finally:
        for p in (first_cloud, edge):
            p.kill()
    assert edge.returncode == 0, stderr
    local = train.train(train.build(dataclasses.replace(config, backend="threads"), digits), schedule="sequential",
                        progress=False, evaluate=True)  # fmt: skip
    assert resumed.start_step >= 8 and resumed.cloud_losses == local.cloud_losses
    assert resumed.edges[0].cloud_accuracy == local.edges[0].cloud_accuracy
    assert "dialling again" in stderr and "the cloud resumes the run at step" in stderr, stderr


def test_the_cloud_refuses_an_edge_of_another_version_and_one_beyond_its_reconnects(token):
    """Through gRPC itself: a hello of another wire format is refused with the line naming both;
    an edge that dials in once more than --max-restarts allows is refused (exit 1), and the message
    over the run's size limit is refused naming both sizes."""
    from hier_jax.remote.backend import RemoteBackend

    lines: list[str] = []
    port = transport.free_port()
    server = transport.CloudServer(f"127.0.0.1:{port}", Security(insecure=True), 10_000, lambda h: None, lines.append)
    backend = RemoteBackend(server, lambda: None, 1000, {}, 10.0, lines.append, max_restarts=0)
    address = f"127.0.0.1:{port}"

    def dial():
        return transport.dial(address, Security(insecure=True), 10_000, {"edge": 0}, 10.0)

    try:
        channel = grpc.insecure_channel(address)
        wrong = transport.Link(channel, TOKEN, {"edge": 0, "versions": {**transport.versions(), "wire": 99}})
        kind, _, body = wrong.receive(10.0)
        wrong.close()
        assert kind == transport.REFUSED and "this edge runs wire format 99, the cloud 1" in body.decode()
        first = dial()
        with pytest.raises(transport.CloudRefused, match="edge 0 has dialled in 1 times, all this run allows"):
            dial()
        first.send(transport.REPLY, 1, b"x" * 20_000)
        with pytest.raises(transport.LinkDown, match="a message of 20,005 B is over the limit of 10,000 B"):
            first.receive(10.0)
        first.close()
    finally:
        backend.server.stop()
    assert [e["event"] for e in backend.events] == ["refused"]
    assert any("wire format 99" in line for line in lines)


def test_an_edge_keeps_its_own_checkpoints_for_its_run_only(tmp_path):
    from hier_jax.remote import codec
    from hier_jax.remote.edge import KEEP, OwnCheckpoints

    state = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "step": np.int32(3)}
    for directory in ("", str(tmp_path / "own")):
        own = OwnCheckpoints(directory, {"edge": 0, "bits": 4}, {})
        for step in range(KEEP + 2):
            own.save(step, {**state, "step": np.int32(step)})
        assert sorted(own.steps()) == list(range(2, KEEP + 2))  # the oldest go
        assert own.steps()[3] == codec.digest({**state, "step": np.int32(3)})
        np.testing.assert_array_equal(own.load(3, 1000)["params"]["w"], state["params"]["w"])
    again = OwnCheckpoints(str(tmp_path / "own"), {"edge": 0, "bits": 4}, {})  # the process started again
    assert sorted(again.steps()) == list(range(2, KEEP + 2))
    with pytest.raises(UserError, match="holds another run's edge states"):
        OwnCheckpoints(str(tmp_path / "own"), {"edge": 0, "bits": 8}, {})
    assert codec.digest(state) != codec.digest({**state, "step": np.int32(4)})


def test_versions_name_what_differs():
    ours = transport.versions()
    assert transport.incompatible(ours) is None
    assert transport.incompatible({**ours, "jax": "0.0.1"}) is None  # a different JAX only warns
    line = transport.incompatible({**ours, "hier_jax": "9.9"})
    assert line == f"this edge runs hier-jax 9.9, the cloud {ours['hier_jax']}: run the same version on both"
