"""Resolution of settings: precedence CLI > env > ini > default, and every bad value."""

from __future__ import annotations

import pytest

from pytest_kerasmp.plugin import config as cfg


def ini_of(**values):
    return lambda name: values.get(name, "" if name != cfg.REQUIRE_INI else False)


def resolve(cli=None, env=None, **ini):
    return cfg.resolve_settings(cli or {}, env or {}, ini_of(**ini))


def test_default_is_auto_and_not_requested():
    s = resolve()
    assert (s.gpus, s.requested, s.gpus_source, s.gpu_memory_mb, s.require_gpu) == (
        "auto",
        False,
        "the default",
        None,
        False,
    )


@pytest.mark.parametrize(
    ("cli", "env", "ini", "expected"),
    [
        ("3", "2", "1", (3, "the command line")),
        (None, "2", "1", (2, "env PYTEST_KERASMP_GPUS")),
        (None, None, "1", (1, "ini kerasmp_gpus")),
        (None, None, "auto", ("auto", "ini kerasmp_gpus")),
        ("AUTO", None, None, ("auto", "the command line")),
    ],
)
def test_precedence_cli_env_ini(cli, env, ini, expected):
    s = resolve(
        {"kerasmp_gpus": cli},
        {cfg.GPUS_ENV: env} if env else {},
        **({cfg.GPUS_INI: ini} if ini else {}),
    )
    assert (s.gpus, s.gpus_source) == expected
    assert s.requested


@pytest.mark.parametrize(
    ("where", "value", "source"),
    [
        ("cli", "-1", "the command line"),
        ("cli", "two", "the command line"),
        ("env", "-3", "env PYTEST_KERASMP_GPUS"),
        ("ini", "1.5", "ini kerasmp_gpus"),
    ],
)
def test_bad_gpus_say_where_they_came_from(where, value, source):
    kwargs = {
        "cli": {"cli": {"kerasmp_gpus": value}},
        "env": {"env": {cfg.GPUS_ENV: value}},
        "ini": {cfg.GPUS_INI: value},
    }[where]
    with pytest.raises(pytest.UsageError) as info:
        resolve(**kwargs)
    assert str(info.value) == cfg.BAD_VALUE.format(
        name="--kerasmp-gpus", value=value, source=source, valid=cfg.GPUS_VALID
    )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("off", ["off", "0", "none", "OFF"])
def test_off_on_the_command_line_wins_over_env_and_ini(off):
    s = resolve({"kerasmp_gpus": off}, {cfg.GPUS_ENV: "2"}, **{cfg.GPUS_INI: "4"})
    assert (s.requested, s.gpus_source) == (False, "the command line")
    assert not resolve(env={cfg.GPUS_ENV: off}, **{cfg.GPUS_INI: "4"}).requested


@pytest.mark.parametrize(
    ("where", "source"), [("env", "env PYTEST_KERASMP_REQUIRE_GPU"), ("ini", "ini kerasmp_require_gpu")]
)
def test_bad_require_gpu_names_the_option_and_its_source(where, source):
    kwargs = {"env": {"env": {cfg.REQUIRE_ENV: "maybe"}}, "ini": {cfg.REQUIRE_INI: "maybe"}}[where]
    with pytest.raises(pytest.UsageError) as info:
        resolve(**kwargs)
    assert str(info.value) == cfg.BAD_VALUE.format(
        name="--kerasmp-require-gpu", value="maybe", source=source, valid=cfg.REQUIRE_VALID
    )


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5"])
def test_bad_gpu_memory(value):
    with pytest.raises(pytest.UsageError, match=r"--kerasmp-gpu-memory=.* \(from env .*megabytes"):
        resolve(env={cfg.MEMORY_ENV: value})


def test_gpu_memory_and_require_gpu_from_each_source():
    assert resolve({"kerasmp_gpu_memory": "512"}).gpu_memory_mb == 512
    assert resolve(**{cfg.MEMORY_INI: "256"}).gpu_memory_mb == 256
    assert resolve({"kerasmp_require_gpu": True}).require_gpu
    assert resolve(env={cfg.REQUIRE_ENV: "yes"}).require_gpu
    assert not resolve(env={cfg.REQUIRE_ENV: "0"}, **{cfg.REQUIRE_INI: True}).require_gpu
    assert resolve(**{cfg.REQUIRE_INI: True}).require_gpu
    with pytest.raises(pytest.UsageError, match="use 1/true/yes or 0/false/no"):
        resolve(env={cfg.REQUIRE_ENV: "maybe"})


def test_require_gpu_refuses_plans_the_machine_cannot_hold():
    wanted = cfg.Settings(
        gpus=4, gpus_source="the command line", requested=True, require_gpu=True,
        require_source="env PYTEST_KERASMP_REQUIRE_GPU",
    )
    with pytest.raises(pytest.UsageError) as info:
        cfg.check_required_gpus(wanted, 2)
    assert str(info.value) == cfg.too_few_gpus(wanted, 2)
    assert "asks for 4 GPU slots but 2 GPUs found" in str(info.value)
    assert "(from env PYTEST_KERASMP_REQUIRE_GPU)" in str(info.value)
    with pytest.raises(pytest.UsageError, match="no GPU was found"):
        cfg.check_required_gpus(cfg.Settings(require_gpu=True), 0)
    cfg.check_required_gpus(wanted, 4)
    cfg.check_required_gpus(cfg.Settings(gpus=8), 0)  # without require: planning decides


def test_command_line_reproduces_the_settings():
    s = cfg.Settings(gpus=2, gpu_memory_mb=1024, require_gpu=True)
    assert s.command_line() == "--kerasmp-gpus=2 --kerasmp-gpu-memory=1024 --kerasmp-require-gpu (from the default)"
    s = cfg.Settings(
        gpus=2, gpus_source="the command line", gpu_memory_mb=1024, memory_source="the command line",
        require_gpu=True, require_source="env PYTEST_KERASMP_REQUIRE_GPU",
    )
    assert s.command_line() == (
        "--kerasmp-gpus=2 --kerasmp-gpu-memory=1024 (from the command line), "
        "--kerasmp-require-gpu (from env PYTEST_KERASMP_REQUIRE_GPU)"
    )
