"""Clusters reachable from this machine only: what every process of the plugin listens on.

Real clusters on every installed Keras backend, each task's listening sockets read from
``/proc`` (``slots.network``). A refusal of namespaces is real too: the script runs in a user
namespace whose ``max_net_namespaces`` and ``max_user_namespaces`` are 0, so the kernel
refuses the private network exactly as it does where namespaces are not allowed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time

import backend_tasks
import pytest
from conftest import CHILD_TIMEOUT_S, running

from pytest_kerasmp import InferenceServer, KerasCluster, WorkerPool
from pytest_kerasmp.errors import CLUSTER_NO_PRIVATE_NETWORK, NETWORK_SUMMARY
from pytest_kerasmp.plugin import config as cfg
from pytest_kerasmp.runtime.process import netns
from pytest_kerasmp.slots import network, placement
from cpu_slots import CPU0, CPU1

TESTS = os.path.dirname(backend_tasks.__file__)
INSTALLED = [b for b in ("tensorflow", "jax", "torch") if importlib.util.find_spec(b) is not None]


def _refusing_namespaces() -> list[str]:
    """A command prefix under which the kernel refuses new network and user namespaces."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Ur", "true"], capture_output=True).returncode:
        pytest.skip("unshare -Ur is not available here: namespaces are refused anyway, nothing to simulate")
    limits = "echo 0 > /proc/sys/user/max_net_namespaces && echo 0 > /proc/sys/user/max_user_namespaces && exec \"$@\""
    return ["unshare", "-Ur", "sh", "-c", limits, "sh"]


def test_listening_sockets_are_read_with_their_reach(tmp_path):
    import socket

    with socket.socket(socket.AF_INET6) as every, socket.socket() as local:
        every.bind(("::", 0))
        every.listen()
        local.bind(("127.0.0.1", 0))
        local.listen()
        found = {x.port: x for x in network.listening(os.getpid())}
        ports = every.getsockname()[1], local.getsockname()[1]
    assert found[ports[0]].reachable == (network.interfaces() != ["lo"])
    assert found[ports[1]].reachable is False
    assert found[ports[1]].describe() == f"127.0.0.1:{ports[1]}"
    assert found[ports[0]].describe() == f"[::]:{ports[0]}"


def _skip_where_refused() -> None:
    try:
        netns.PrivateNetwork().close()
    except netns.PrivateNetworkRefused as exc:
        pytest.skip(f"the kernel refuses a private network here ({exc}): the refusal tests below cover it")


@pytest.mark.parametrize("backend", INSTALLED)
def test_a_two_task_cluster_listens_on_loopback_or_inside_a_private_namespace(backend, monkeypatch):
    if backend == "tensorflow":
        _skip_where_refused()
    monkeypatch.setenv("KERAS_BACKEND", backend)
    with KerasCluster(2, slots=[CPU0, CPU1], name=f"net-{backend}", run_timeout_s=90, start_timeout_s=90) as cluster:
        assert cluster.run(backend_tasks.all_reduce_sum) == [3.0, 3.0]
        audits = [network.audit(pid) for pid in cluster.pids() if pid]
        holder = cluster.network.pid if cluster.network is not None else None
    assert len(audits) == 2
    for audit in audits:
        assert audit["listening"], f"{backend}: a task that ran a collective listens on something"
        assert audit["exposed"] == [], f"{backend}: reachable from the network: {audit}"
    if backend == "tensorflow":  # its gRPC server listens on [::]: inside a namespace with only lo
        assert all(a["private"] for a in audits)
        assert holder is not None
        assert not running(holder), "the namespace's holder outlived its cluster"
    else:  # bound to 127.0.0.1 by the plugin (torch's store) or the framework (JAX)
        assert not any(a["private"] for a in audits)
        assert holder is None


def test_a_pool_worker_and_a_server_listen_on_nothing(tmp_path):
    import numpy as np

    from pytest_kerasmp import ModelRef

    path = tmp_path / "m.keras"
    backend_tasks.save_linear(str(path))
    with WorkerPool([CPU0], name="net-pool") as pool, InferenceServer(ModelRef.from_file(path), slot=CPU1, name="net-srv") as server:
        assert pool.submit(backend_tasks.expected, np.ones((2, 4), np.float32)).result(timeout=60) is not None
        server.predict(np.ones((4,), np.float32))
        assert network.listening(pool.pids()[0]) == []
        assert network.listening(server.pid) == []


def test_the_private_network_has_only_loopback_and_its_holder_ends_with_close():
    _skip_where_refused()
    net = netns.PrivateNetwork()
    try:
        assert network.interfaces(net.pid) == ["lo"]
        assert network.namespace(net.pid) != network.namespace()
    finally:
        net.close()
    assert not running(net.pid)


SCRIPT = """
import sys, warnings
sys.path.insert(0, {tests!r})
import backend_tasks
from pytest_kerasmp import DeviceSlot, TFCluster, ClusterStartError
from pytest_kerasmp.slots import network
if __name__ == "__main__":
    slots = [DeviceSlot(index=0, kind="CPU", cores=({c0},)), DeviceSlot(index=1, kind="CPU", cores=({c1},))]
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            with TFCluster(2, slots=slots, private_network={mode!r}, name="exposed", start_timeout_s=90) as c:
                c.run(backend_tasks.all_reduce_sum)
                print("EXPOSED", *[p for pid in c.pids() for p in network.audit(pid)["exposed"]])
        print("SAID", *[str(w.message) for w in said])
    except ClusterStartError as exc:
        print("REFUSED", exc)
"""


def _run_refused(tmp_path, mode: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "owner.py"
    script.write_text(SCRIPT.format(tests=TESTS, c0=CPU0.cores[0], c1=CPU1.cores[0], mode=mode))
    return subprocess.run([*_refusing_namespaces(), sys.executable, str(script)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def test_require_refuses_a_cluster_at_once_when_the_kernel_refuses_namespaces(tmp_path):
    t0 = time.monotonic()
    done = _run_refused(tmp_path, "require")
    assert "REFUSED" in done.stdout, done.stdout + done.stderr
    expected = CLUSTER_NO_PRIVATE_NETWORK.format(reason="unshare(CLONE_NEWNET): No space left on device")
    assert expected in done.stdout
    assert time.monotonic() - t0 < 60  # no task was started (a TensorFlow import each)


def test_auto_starts_exposed_when_refused_and_says_which_ports_once(tmp_path):
    done = _run_refused(tmp_path, "auto")
    exposed = next(line for line in done.stdout.splitlines() if line.startswith("EXPOSED")).split()[1:]
    assert len(exposed) == 2, done.stdout + done.stderr  # one gRPC server per task, on [::]
    said = next(line for line in done.stdout.splitlines() if line.startswith("SAID"))
    assert said.count("reachable from the network") == 1
    assert "no private network: unshare(CLONE_NEWNET): No space left on device" in said
    assert "--kerasmp-private-network=require" in said


SUITE = """
import sys
sys.path.insert(0, {tests!r})
import backend_tasks
import pytest

@pytest.mark.kerasmp_slots(2)
def test_cluster(kerasmp_tf_cluster):
    cluster = kerasmp_tf_cluster(2)
    assert cluster.run(backend_tasks.all_reduce_sum) == [3.0, 3.0]
"""


@pytest.mark.parametrize("mode", ["auto", "require"])
def test_the_session_names_exposed_tasks_in_one_line_and_require_fails_it(pytester, mode):
    pytester.makepyfile(test_suite=SUITE.format(tests=TESTS))
    args = ["-p", "no:cacheprovider", "--kerasmp-gpus=2", f"{cfg.PRIVATE_NETWORK_OPTION}={mode}"]
    result = pytester.run(*_refusing_namespaces(), sys.executable, "-m", "pytest", *args, timeout=CHILD_TIMEOUT_S)
    out = result.stdout.str()
    if mode == "auto":
        assert result.ret == 0, out
        lines = [line for line in out.splitlines() if "reachable from the network" in line]
        assert len(lines) == 1, out
        assert lines[0].startswith("kerasmp: " + NETWORK_SUMMARY.split("{")[0])
        assert lines[0].count("main/cluster0 worker:") == 2
        assert lines[0].count("no private network: unshare(CLONE_NEWNET)") == 1
        assert "EXPOSED [::]:" in out  # the placement table's network column
    else:
        assert result.ret == 1, out
        assert "1 failed" in out and "kerasmp-private-network=require is set" in out


def test_the_option_is_checked_and_reaches_the_clusters(pytester, run_pytest):
    pytester.makepyfile("""
        import os
        from pytest_kerasmp import TFCluster
        def test_mode():
            assert os.environ["PYTEST_KERASMP_PRIVATE_NETWORK"] == "off"
            assert TFCluster(1, start=False).private_network == "off"
    """)
    assert run_pytest(f"{cfg.PRIVATE_NETWORK_OPTION}=off").ret == 0
    bad = run_pytest(f"{cfg.PRIVATE_NETWORK_OPTION}=maybe")
    assert bad.ret == 4
    bad.stderr.fnmatch_lines([f"*{cfg.PRIVATE_NETWORK_OPTION}='maybe' (from the command line) is invalid: use auto, require or off*"])


def test_placement_records_keep_every_reading():
    assert placement.network_cell({"exposed": ["[::]:1"], "listening": ["[::]:1"]}) == "EXPOSED [::]:1"
    assert placement.network_cell({"private": True, "listening": ["[::]:1"]}) == "private ns (1 listening)"
    assert placement.network_cell({"listening": ["127.0.0.1:2"]}) == "loopback"
    assert placement.network_cell({}) == "-"


def test_a_holder_whose_owner_dies_ends_too(tmp_path):
    _skip_where_refused()
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent("""
        import os
        from pytest_kerasmp.runtime.process import netns
        net = netns.PrivateNetwork()
        print(net.pid, flush=True)
        os._exit(0)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    holder = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while running(holder) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(holder)
