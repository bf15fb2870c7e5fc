"""--kerasmp-seed and --kerasmp-deterministic: every pinned or started process gets its seed."""

from __future__ import annotations

import json

import pytest

from pytest_kerasmp.plugin.config import BAD_VALUE
from pytest_kerasmp.slots.seeding import SEED_ENV, SEED_VALID, derive_seed
from pytest_kerasmp.plugin.speedgate import SEED_PICKED_HEADER

DRAWS = """
import json, os, pathlib, random
import numpy as np

def test_draw(kerasmp_seed):
    out = pathlib.Path(os.environ["DRAW_OUT"])
    out.write_text(json.dumps({"base": kerasmp_seed, "random": random.random(), "numpy": float(np.random.random()),
                               "env": os.environ.get("PYTEST_KERASMP_SEED"), "det": os.environ.get("PYTEST_KERASMP_DETERMINISTIC")}))
"""


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(7, 0, "pytest") == derive_seed(7, 0, "pytest")
    seeds = {derive_seed(7, s, r) for s in (None, 0, 1) for r in ("pytest", "xdist-worker", "pool-worker")}
    assert len(seeds) == 9 and all(0 <= s < 2**32 for s in seeds)
    assert derive_seed(7, 0, "pytest") != derive_seed(8, 0, "pytest")


def test_seed_is_in_the_header_applied_and_recorded(pytester, run_pytest, tmp_path, monkeypatch):
    pytester.makepyfile(test_draws=DRAWS)
    out = tmp_path / "draw.json"
    monkeypatch.setenv("DRAW_OUT", str(out))
    draws = []
    for seed in ("7", "7", "8"):
        result = run_pytest("--kerasmp-gpus=1", f"--kerasmp-seed={seed}", "--kerasmp-deterministic", f"--kerasmp-report={tmp_path / seed}")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"kerasmp: --kerasmp-seed={seed} --kerasmp-deterministic (pass it again to repeat this run's seeds)"])
        draws.append(json.loads(out.read_text()))
    assert draws[0] == draws[1] and draws[0]["random"] != draws[2]["random"] and draws[0]["numpy"] != draws[2]["numpy"]
    assert draws[0]["base"] == 7 and draws[0]["env"] == "7" and draws[0]["det"] == "1"
    seeds = json.loads((tmp_path / "7" / "kerasmp-report.json").read_text())["seeds"]
    assert seeds["base"] == 7 and seeds["deterministic"] is True
    assert seeds["this_process"]["seed"] == derive_seed(7, 0, "pytest")  # pinned to slot0
    assert {"slot": 1, "role": "pool-worker", "seed": derive_seed(7, 1, "pool-worker")} not in seeds["derived"]  # one slot
    assert {"slot": 0, "role": "pool-worker", "seed": derive_seed(7, 0, "pool-worker")} in seeds["derived"]


def test_unseeded_run_prints_no_seed_and_bad_seed_is_a_usage_error(pytester, run_pytest, tmp_path, monkeypatch):
    pytester.makepyfile(test_draws=DRAWS)
    monkeypatch.setenv("DRAW_OUT", str(tmp_path / "d.json"))
    result = run_pytest()
    result.assert_outcomes(passed=1)
    assert "--kerasmp-seed" not in result.stdout.str()
    bad = run_pytest("--kerasmp-seed=abc")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*" + BAD_VALUE.format(name="--kerasmp-seed", value="abc", source="the command line", valid=SEED_VALID)])


@pytest.mark.parametrize("value", ["abc", "-5", "1.5"])
def test_a_bad_seed_in_the_environment_stops_the_session_in_one_line(pytester, run_pytest, monkeypatch, value):
    pytester.makepyfile("def test_never(): raise AssertionError('ran')")
    monkeypatch.setenv(SEED_ENV, value)
    result = run_pytest("--kerasmp-gpus=1")  # pinning seeds this process: it used to raise there
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    message = BAD_VALUE.format(name="--kerasmp-seed", value=value, source=f"env {SEED_ENV}", valid=SEED_VALID)
    assert result.errlines[0] == "ERROR: " + message
    assert "Traceback" not in result.stderr.str() and "ran" not in result.stdout.str()
    assert run_pytest("--kerasmp-gpus=1", "--kerasmp-seed=3").ret == 1  # the command line wins over the environment


def test_deterministic_without_a_seed_picks_one_prints_it_and_it_repeats_the_run(pytester, run_pytest, tmp_path, monkeypatch):
    pytester.makepyfile(test_draws=DRAWS)
    out = tmp_path / "draw.json"
    monkeypatch.setenv("DRAW_OUT", str(out))
    first = run_pytest("--kerasmp-gpus=1", "--kerasmp-deterministic")
    first.assert_outcomes(passed=1)
    header = next(line for line in first.outlines if line.startswith("kerasmp: --kerasmp-seed="))
    seed = int(header.split("=")[1].split()[0])
    assert header == SEED_PICKED_HEADER.format(option="--kerasmp-seed", seed=seed, det=" --kerasmp-deterministic")
    picked = json.loads(out.read_text())
    assert picked["base"] == seed and picked["env"] == str(seed) and picked["det"] == "1"
    again = run_pytest("--kerasmp-gpus=1", f"--kerasmp-seed={seed}", "--kerasmp-deterministic")
    again.assert_outcomes(passed=1)
    assert json.loads(out.read_text()) == picked  # the printed options repeat the run's draws


def test_a_started_process_seeds_tensorflow_on_import_with_op_determinism(run_python, monkeypatch):
    """What a child the plugin starts does: seed_process before TensorFlow is imported."""
    monkeypatch.setenv("PYTEST_KERASMP_SEED", "11")
    monkeypatch.setenv("PYTEST_KERASMP_DETERMINISTIC", "1")
    monkeypatch.setenv("PYTEST_KERASMP_ROLE", "pool-worker")
    script = """
        import json
        from pytest_kerasmp.slots.seeding import seed_process
        seed = seed_process(1)
        import tensorflow as tf
        from tensorflow.python.framework import config
        print(json.dumps({"seed": seed, "det": config.is_op_determinism_enabled(),
                          "draw": float(tf.random.uniform(()))}))
    """
    first, second = (run_python(script) for _ in range(2))
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout.splitlines()[-1]), json.loads(second.stdout.splitlines()[-1])
    assert a == b and a["seed"] == derive_seed(11, 1, "pool-worker") and a["det"] is True


def test_a_multiprocessing_child_without_a_role_gets_its_own_seed(run_python, monkeypatch):
    """Same slot as the pytest process, but another seed: role "child", not "pytest"."""
    monkeypatch.setenv("PYTEST_KERASMP_SEED", "5")
    result = run_python("""
        import multiprocessing as mp
        from pytest_kerasmp.slots.seeding import seed_process

        def child(q):
            q.put(seed_process(0))

        if __name__ == "__main__":
            q = mp.get_context("spawn").Queue()
            p = mp.get_context("spawn").Process(target=child, args=(q,))
            p.start()
            print(seed_process(0), q.get(timeout=60))
            p.join()
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(derive_seed(5, 0, "pytest")), str(derive_seed(5, 0, "child"))]
