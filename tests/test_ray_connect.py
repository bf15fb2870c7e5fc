"""Connecting to a Ray cluster is bounded: a wrong address fails in one line that says what was
tried, at once when the host does not resolve or the port refuses, within --kerasmp-ray-timeout
when something answers TCP but no cluster; Ctrl-C during the attempt ends it within 2 s.

None of these tests connects this process to Ray: every connection is made by a child process
(this process may already be connected to the session's test cluster).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from pytest_kerasmp.ray.connect import probe, split_address
from pytest_kerasmp.plugin.config import BAD_VALUE, RAY_OPTION, RAY_TIMEOUT_OPTION, RAY_TIMEOUT_VALID
from pytest_kerasmp.errors import RAY_OPTION_UNREACHABLE, RayConnectError

pytest.importorskip("ray")

UNRESOLVABLE = "nosuchhost.invalid:1"  # .invalid never resolves (RFC 6761)

USES_POOL = """
def add(a, b):
    return a + b

def test_pool(kerasmp_pool):
    assert kerasmp_pool.submit(add, 1, 2).result(timeout=60) == 3
"""


def _refused_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port():
    """A loopback port that accepts TCP connections and never says a word (not a Ray GCS)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    for conn in accepted:
        conn.close()
    server.close()


def _run(pytester: pytest.Pytester, *args: str, within: float) -> pytest.RunResult:
    """pytest in a subprocess that must end ``within`` seconds (a broken bound fails here, in seconds)."""
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=within)


def _prefix(address: str) -> str:
    return RAY_OPTION_UNREACHABLE.format(option=RAY_OPTION, address=address, source="the command line", error="")


@pytest.mark.parametrize("address, what", [
    (UNRESOLVABLE, "the host name 'nosuchhost.invalid' does not resolve"),
    ("127.0.0.1:{refused}", "a TCP connection to 127.0.0.1 port {refused} was refused: nothing listens on that port"),
])
def test_a_wrong_address_stops_the_session_at_once_in_one_line(pytester, address, what):
    refused = _refused_port()
    address, what = address.format(refused=refused), what.format(refused=refused)
    pytester.makepyfile(test_uses_pool=USES_POOL)
    result = _run(pytester, f"{RAY_OPTION}={address}", within=20)  # at once: Ray alone retries for good
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert len(errors) == 1, result.errlines
    assert errors[0].startswith("ERROR: " + _prefix(address) + f"cannot connect to a Ray cluster at {address!r}: {what}")
    assert "; check that the cluster runs" in errors[0] and errors[0].endswith("(--kerasmp-ray-timeout)")
    assert "Traceback" not in result.stderr.str()


def test_a_port_that_answers_but_is_no_cluster_fails_the_fixture_within_the_bound(pytester, silent_port):
    pytester.makepyfile(test_uses_pool=USES_POOL)
    address = f"127.0.0.1:{silent_port}"
    result = _run(pytester, f"{RAY_OPTION}={address}", f"{RAY_TIMEOUT_OPTION}=2", within=30)  # 2 s, plus imports
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        _prefix(address) + "*accepts TCP connections, but Ray's connect (ray.init) did not finish within 2 s*",
    ])
    assert "Traceback" not in result.stdout.str()


CTRL_C = """
import os, signal, sys, threading, time
from pytest_kerasmp.ray.cluster import connect
signal.signal(signal.SIGINT, signal.default_int_handler)
print("connecting", flush=True)
t0 = time.monotonic()
try:
    connect(sys.argv[1], timeout_s=60)
except KeyboardInterrupt:
    print(f"interrupted after {{time.monotonic() - t0:.2f}} s", flush=True)
    raise
"""


def test_ctrl_c_during_a_connect_ends_it_within_two_seconds(tmp_path, silent_port):
    script = tmp_path / "connect.py"
    script.write_text(CTRL_C.format())
    with subprocess.Popen(
        [sys.executable, str(script), f"127.0.0.1:{silent_port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout.readline().strip() == "connecting", proc.stderr.read()
            time.sleep(3)  # past the probe, inside ray.init (which retries for good on its own)
            assert proc.poll() is None
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)
            assert time.monotonic() - t0 < 2
            assert "KeyboardInterrupt" in proc.stderr.read()
        finally:
            proc.kill()


def test_the_python_api_takes_the_bound_and_says_what_was_tried(run_python):
    done = run_python(f"""
        import time
        from pytest_kerasmp import DeviceSlot, RayBackend, RayConnectError, WorkerPool, plan_ray_slots
        from pytest_kerasmp.ray.cluster import import_ray
        for attempt in (lambda: plan_ray_slots({UNRESOLVABLE!r}, timeout_s=30),
                        lambda: WorkerPool([DeviceSlot(index=0, kind="CPU", cores=(0,), node="n")], backend=RayBackend(address="127.0.0.1:{_refused_port()}", timeout_s=5))):
            t0 = time.monotonic()
            try:
                attempt()
            except RayConnectError as exc:
                print(round(time.monotonic() - t0), exc)
        print("connected:", import_ray().is_initialized())
    """)
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stderr[-3000:]
    # An unresolvable host fails at once, not at the bound (30 s): 10 s is room for a loaded machine.
    seconds, _, said = lines[0].partition(" ")
    assert int(seconds) < 10 and said.startswith(f"cannot connect to a Ray cluster at {UNRESOLVABLE!r}: the host name")
    assert "was refused: nothing listens on that port" in lines[1] and lines[1].endswith("after 5 s (timeout_s)")
    assert lines[2] == "connected: False"


def test_bad_timeouts_and_addresses_are_named():
    with pytest.raises(RayConnectError, match="'garbage': it is not host:port"):
        probe("garbage", 1)
    assert split_address("ray://10.0.0.5:10001") == ("10.0.0.5", 10001)
    assert split_address("[::1]:6379") == ("::1", 6379)


@pytest.mark.parametrize("where", ["cli", "env", "ini"])
def test_a_bad_ray_timeout_names_the_option_and_its_source(pytester, run_pytest, monkeypatch, where):
    from pytest_kerasmp.plugin.config import RAY_TIMEOUT_ENV, RAY_TIMEOUT_INI

    pytester.makepyfile("def test_nothing(): pass")
    args = []
    if where == "cli":
        args, source = [f"{RAY_TIMEOUT_OPTION}=-1"], "the command line"
    elif where == "env":
        monkeypatch.setenv(RAY_TIMEOUT_ENV, "-1")
        source = f"env {RAY_TIMEOUT_ENV}"
    else:
        pytester.makeini(f"[pytest]\n{RAY_TIMEOUT_INI} = -1\n")
        source = f"ini {RAY_TIMEOUT_INI}"
    result = run_pytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    message = BAD_VALUE.format(name=RAY_TIMEOUT_OPTION, value="-1", source=source, valid=RAY_TIMEOUT_VALID)
    result.stderr.fnmatch_lines(["ERROR: " + message])
