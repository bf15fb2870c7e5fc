"""Plugin behaviour, run as users run it: pytest subprocesses through pytester."""

from __future__ import annotations

import os

import pytest

from pytest_kerasmp.plugin import config as cfg
from pytest_kerasmp.plugin import leasing, markers
from pytest_kerasmp.errors import FRAMEWORK_ALREADY_INITIALIZED
from pytest_kerasmp.plugin.fixtures import DEVICE_UNPINNED

def test_help_shows_the_kerasmp_group(run_pytest):
    result = run_pytest("--help")
    result.stdout.fnmatch_lines(
        [
            "multiprocess Keras: device slots, pools, servers:",
            "*--kerasmp-gpus=N|auto",
            "*Number of device slots for this session*",
            "*--kerasmp-gpu-memory=MB*",
            "*--kerasmp-require-gpu*",
            "*kerasmp_gpus (string):*",
        ]
    )


def test_fixtures_and_markers_are_documented(run_pytest, pytester):
    pytester.makepyfile("def test_nothing(): pass")
    fixtures = run_pytest("--fixtures")
    fixtures.stdout.fnmatch_lines(
        [
            "kerasmp_slots*",
            "*The device slots of this test (function scope; --kerasmp-gpus, @pytest.mark.kerasmp_slots(n))*",
            "kerasmp_worker_slots [[]session scope[]]*",
            "*The device slots this pytest process owns for the session*",
            "kerasmp_device*",
            "*The slot this process is pinned to; fails when no slot was asked for*",
            "kerasmp_pool [[]session scope[]]*",
            "*A warm WorkerPool, one spawn worker per slot this process owns*",
            "kerasmp_pool_factory*",
            "*Factory: make_pool(slots=None, **options) -> WorkerPool*",
        ]
    )
    fixtures.stdout.fnmatch_lines([
        "kerasmp_load_generator [[]session scope[]]*",
        "*A LoadGenerator: 4 sender processes on the slots this process owns other than its first*",
    ])
    run_pytest("--markers").stdout.fnmatch_lines(["@pytest.mark." + markers.MARKER_HELP, "@pytest.mark." + leasing.MARKER_HELP])


def test_plugin_module_does_not_import_tensorflow(run_python):
    done = run_python(
        "import sys, pytest_kerasmp.plugin\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
        "print('clean')\n"
    )
    assert done.stdout.strip() == "clean", done.stderr


def test_header_states_the_plan_and_pins_this_process(run_pytest, probe):
    cores = sorted(os.sched_getaffinity(0))
    result = run_pytest("--kerasmp-gpus=1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "kerasmp: --kerasmp-gpus=1 (from the command line) -> 1 CPU slot (no GPU found): "
            f"slot0 cores {{{', '.join(map(str, cores))}}}; this process pinned to slot0"
        ]
    )
    main = probe()["main"]
    assert main["slot"]["index"] == 0 and main["cores"] == cores
    assert main["cuda_visible"] == "-1"


def test_header_under_fake_gpus_and_outer_visible_devices(run_pytest, probe, monkeypatch):
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    result = run_pytest("--kerasmp-gpus=3", "--kerasmp-gpu-memory=2048")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "kerasmp: --kerasmp-gpus=3 --kerasmp-gpu-memory=2048 (from the command line) -> "
            "3 GPU slots on 2 GPUs (slot0 and slot2 share GPU 3; 2048 MB cap per process, no memory growth): "
            "slot0 GPU 3, slot1 GPU 5, slot2 GPU 3; this process pinned to slot0"
        ]
    )
    main = probe()["main"]
    assert main["cuda_visible"] == "3" and main["slot"]["memory_limit_mb"] == 2048
    assert main["growth"] is None  # the cap replaces growth, as the header says
    result = run_pytest("--kerasmp-gpus=3")
    result.stdout.fnmatch_lines(["*-> 3 GPU slots on 2 GPUs (slot0 and slot2 share GPU 3; memory growth on in every process): *"])
    assert probe()["main"]["growth"] == "true"


@pytest.mark.parametrize(
    ("how", "value", "source"),
    [
        ("cli", "-1", "the command line"),
        ("cli", "two", "the command line"),
        ("env", "-2", "env PYTEST_KERASMP_GPUS"),
        ("ini", "two", "ini kerasmp_gpus"),
    ],
)
def test_bad_values_are_one_line_usage_errors(run_pytest, pytester, monkeypatch, how, value, source):
    pytester.makepyfile("def test_nothing(): pass")
    args: list[str] = []
    if how == "cli":
        args.append(f"--kerasmp-gpus={value}")
    elif how == "env":
        monkeypatch.setenv(cfg.GPUS_ENV, value)
    else:
        pytester.makeini(f"[pytest]\nkerasmp_gpus = {value}\n")
    result = run_pytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    message = cfg.BAD_VALUE.format(
        name="--kerasmp-gpus", value=value, source=source, valid=cfg.GPUS_VALID
    )
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_require_gpu_with_too_few_gpus_is_a_usage_error(run_pytest, pytester, monkeypatch):
    pytester.makepyfile("def test_nothing(): pass")
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "2")
    result = run_pytest("--kerasmp-gpus=4", "--kerasmp-require-gpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    wanted = cfg.Settings(4, "the command line", True, None, True, require_source="the command line")
    result.stderr.fnmatch_lines([f"ERROR: {cfg.too_few_gpus(wanted, 2)}"])
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "0")
    monkeypatch.setenv(cfg.REQUIRE_ENV, "1")
    result = run_pytest("--kerasmp-gpus=1")
    message = cfg.NO_GPU_REQUIRED.format(require_source=f"env {cfg.REQUIRE_ENV}")
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_bad_require_gpu_in_ini_names_the_option_and_the_file(run_pytest, pytester):
    pytester.makepyfile("def test_nothing(): pass")
    pytester.makeini("[pytest]\nkerasmp_require_gpu = maybe\n")
    result = run_pytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    message = cfg.BAD_VALUE.format(
        name="--kerasmp-require-gpu", value="maybe", source="ini kerasmp_require_gpu", valid=cfg.REQUIRE_VALID
    )
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_off_on_the_command_line_beats_ini_and_kerasmp_device_says_what_to_pass(run_pytest, pytester, monkeypatch):
    pytester.makepyfile("def test_device(kerasmp_device):\n    assert kerasmp_device.tf_device\n")
    pytester.makeini("[pytest]\nkerasmp_gpus = 2\n")
    monkeypatch.setenv(cfg.GPUS_ENV, "1")
    run_pytest().assert_outcomes(passed=1)
    result = run_pytest("--kerasmp-gpus=off")
    result.assert_outcomes(errors=1)
    assert "kerasmp:" not in result.stdout.str()  # nothing planned, nothing pinned
    result.stdout.fnmatch_lines(
        ["*" + DEVICE_UNPINNED.format(why="slots are off, from the command line")]
    )


def test_more_slots_than_cores_warns_at_the_option_not_the_plugin(run_pytest, pytester):
    pytester.makepyfile("def test_nothing(): pass")
    n = len(os.sched_getaffinity(0)) + 1
    ini = pytester.makeini(f"[pytest]\nxfail_strict = true\nkerasmp_gpus = {n}\n")
    result = run_pytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*{ini}:3: KerasMPWarning: kerasmp: --kerasmp-gpus={n} planned over the session's usable cores*"])
    assert "pytest_kerasmp/plugin/" not in result.stdout.str()


@pytest.mark.parametrize("args", [("-p", "no:kerasmp"), ()], ids=["disabled", "not-requested"])
def test_suite_is_untouched_unless_slots_are_requested(run_pytest, probe, args):
    result = run_pytest(*args)
    result.assert_outcomes(passed=0, errors=1) if args else result.assert_outcomes(passed=1)
    if args:  # without the plugin its fixtures do not exist, and nothing else changed
        result.stdout.fnmatch_lines(["*fixture 'kerasmp_slots' not found*"])
        assert run_pytest(*args, "--kerasmp-gpus=2").ret == pytest.ExitCode.USAGE_ERROR
        return
    assert "kerasmp:" not in result.stdout.str()
    main = probe()["main"]
    assert main["slot"] is None and main["cuda_visible"] is None
    assert main["cores"] == sorted(os.sched_getaffinity(0))
    assert main["n_slots"] == len(os.sched_getaffinity(0))  # fixtures still plan auto slots


MARKED = """
import pytest

@pytest.mark.kerasmp_gpus(2)
def test_two_gpus():
    pass

@pytest.mark.kerasmp_gpus(1)
def test_one_gpu():
    pass
"""


def test_gpu_marker_skips_or_fails_under_require(run_pytest, pytester, monkeypatch):
    pytester.makepyfile(MARKED)
    monkeypatch.setenv("PYTEST_KERASMP_FAKE_GPUS", "1")
    result = run_pytest("--strict-markers", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    # The skip points at the test, not at a line of the plugin; counts read right.
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_gpu_marker_skips_or_fails_under_require.py:[0-9]: "
                                 + markers.MARKER_SKIP.format(gpus="2 GPUs", found=1)])
    assert "needs 2 GPUs, 1 found" in result.stdout.str()
    result = run_pytest("--strict-markers", "--kerasmp-require-gpu")
    result.assert_outcomes(passed=1, errors=1)  # a failure in setup
    result.stdout.fnmatch_lines(["*" + markers.MARKER_FAIL.format(gpus="2 GPUs", found=1, source="the command line")])


def test_gpu_marker_with_bad_arguments_fails(run_pytest, pytester):
    pytester.makepyfile(
        "import pytest\n@pytest.mark.kerasmp_gpus('two')\ndef test_x(): pass\n"
    )
    result = run_pytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*" + markers.MARKER_BAD.format(args=("two",))])


def test_root_conftest_importing_tensorflow_is_pinned_first(run_pytest, probe, pytester, monkeypatch):
    pytester.makeconftest("import tensorflow as tf\nimport keras\n")
    monkeypatch.setenv("PROBE_TF", "1")
    result = run_pytest("--kerasmp-gpus=2")
    result.assert_outcomes(passed=1)
    main = probe()["main"]
    assert main["cores"] == list(main["slot"]["cores"]) == sorted(os.sched_getaffinity(0))[:1]
    assert main["intra"] == main["inter"] == 1
    assert main["tf_gpus"] == 0


def test_tensorflow_initialised_before_pinning_is_a_clear_error(run_pytest, pytester, monkeypatch):
    # A plugin given with -p is imported before initial conftests: it runs a TF op too early.
    pytester.makepyfile(
        early_tf="import tensorflow as tf\ntf.constant(1.0) + 1\n",
        test_x="def test_x(): pass\n",
    )
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    result = run_pytest("-p", "early_tf", "--kerasmp-gpus=1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    prefix = FRAMEWORK_ALREADY_INITIALIZED.format(framework="TensorFlow", pid=0, slot="").split(" 0 ")[0]
    result.stderr.fnmatch_lines([f"ERROR: {prefix}*drop --kerasmp-gpus to run unpinned"])
