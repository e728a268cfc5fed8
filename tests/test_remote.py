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

from hier_jax import flags, train
from hier_jax.config import ExperimentConfig
from hier_jax.errors import UserError
from hier_jax.models import ExitHeadConfig

grpc = pytest.importorskip("grpc", reason="the remote backend needs the remote extra (grpcio)")

from hier_jax.remote import launch, transport  # noqa: E402
from hier_jax.remote.config import CloudConfig, EdgeConfig, Security  # noqa: E402

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
    from experiments.bench_remote import make_pki

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    make_pki(d, certs=("cloud", "edge"), cas=("ca", "other_ca"))
    return d


def edge_argv(config: ExperimentConfig, edge: int, port: int, pki: Path, ca: str = "ca.pem") -> list[str]:
    from experiments.edge import EDGE_FLAGS

    values = {p: v for p, v, _ in flags.paths(config) if p.split(".")[0] in EDGE_FLAGS}
    return [
        sys.executable,
        "-m",
        "experiments.edge",
        *flags.as_argv(ExperimentConfig, values),
        "--edge",
        str(edge),
        "--connect",
        f"127.0.0.1:{port}",
        "--tls-ca",
        str(pki / ca),
    ]


def start_edge(argv: list[str], token: str = TOKEN) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", transport.TOKEN_ENV: token}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
        ({"ca": "other_ca.pem"}, None, "certificate is not signed by --tls-ca"),
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
    assert edge.returncode in (1, 2) and edge_words in last and "Traceback" not in stderr, stderr
    assert edge.returncode == (1 if "ca" in change else 2)
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
def test_an_edge_killed_mid_run_and_started_again_ends_as_the_fault_free_run(pki, token, digits):
    """Its connection ends, the scheduler restarts it: the next process to dial in as edge 0 gets the
    state of the last checkpoint (here none: the initial state), replays up to the first step the cloud
    has not trained on without sending it, and goes on."""
    import threading

    config = dataclasses.replace(CONFIG, max_restarts=1, max_steps=8)
    port = transport.free_port()
    first = start_edge(edge_argv(dataclasses.replace(config, kill_edges=((0, 4),)), 0, port, pki))
    processes = [first]

    def start_again():
        first.wait(120)
        processes.append(start_edge(edge_argv(config, 0, port, pki)))

    again = threading.Thread(target=start_again)
    again.start()
    try:
        remote = launch.run(config, digits, cloud_config(port, pki), evaluate=True)
        again.join(120)
        processes[-1].communicate(timeout=120)
    finally:
        for process in processes:
            process.kill()
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
    assert bare.returncode == 1 and "no cloud answers" in outcomes[1][1].strip().splitlines()[-1], outcomes[1]


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
