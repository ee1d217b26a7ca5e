"""The shipped deploy/ files: systemd accepts the unit, and the numbers that must agree across files do."""

import os
import re
import runpy
import shutil
import subprocess

import pytest

from app.config import ConfigError, Settings
from tests.helpers import ROOT

UNIT = ROOT / "deploy" / "musicgen@.service"
SITE = ROOT / "deploy" / "nginx-musicgen.conf"
ENV_EXAMPLE = ROOT / "deploy" / "musicgen.env.example"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def unit_settings() -> dict:
    settings: dict = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def env_example() -> dict:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def nginx_directive(name: str) -> str:
    values = re.findall(rf"^\s*{name}\s+([^;]+);", SITE.read_text(), re.M)
    assert len(values) == 1, (name, values)
    return values[0]


@pytest.fixture
def gunicorn_config(monkeypatch) -> dict:
    """scripts/gunicorn.conf.py's settings with their defaults (it reads overrides from the environment)."""
    for key in [k for k in os.environ if k.startswith("GUNICORN_")]:
        monkeypatch.delenv(key)
    return runpy.run_path(str(ROOT / "scripts" / "gunicorn.conf.py"))


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (scripts/test installs systemd)")
def test_systemd_accepts_the_unit():
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "musicgen" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_unit_runs_as_its_own_user_restarts_and_outlasts_the_graceful_timeout(gunicorn_config):
    unit = unit_settings()
    assert unit["User"] == ["musicgen"] and unit["Restart"] == ["on-failure"]
    assert "/etc/musicgen/musicgen.env" in unit["EnvironmentFile"]
    assert unit["KillMode"] == ["mixed"]  # SIGTERM to gunicorn's master, which runs the graceful stop
    stop_timeout = int(unit["TimeoutStopSec"][0])
    assert stop_timeout > gunicorn_config["graceful_timeout"]
    assert stop_timeout > int(env_example()["GUNICORN_GRACEFUL_TIMEOUT"])


def test_gunicorn_control_socket_is_off(gunicorn_config):
    # gunicorn 27's default socket, ~/.gunicorn/gunicorn.ctl, would be shared by every instance.
    assert gunicorn_config["control_socket_disable"] is True


@pytest.mark.parametrize(("instance", "environment", "port"), [("0", {}, "5555"), ("3", {}, "5558"),
                                                               ("1", {"PORT": "7000"}, "7000")])
def test_unit_port_is_5555_plus_instance_unless_set(instance, environment, port):
    (exec_start,) = unit_settings()["ExecStart"]
    script = re.fullmatch(r"/bin/sh -c '(.*)'", exec_start).group(1)
    assert "exec /opt/musicgen/.venv/bin/gunicorn -c /opt/musicgen/scripts/gunicorn.conf.py wsgi:app" in script
    # systemd turns %i into the instance and $$ into $; then the shell computes PORT.
    script = script.replace("%i", instance).replace("$$", "$").split("; exec ")[0] + '; echo "$PORT"'
    env = {k: v for k, v in os.environ.items() if k != "PORT"} | environment
    assert subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env).stdout.strip() == port


def test_nginx_body_limit_equals_the_app_limit():
    assert nginx_directive("client_max_body_size") == "16m"
    assert 16 * 1024 * 1024 == Settings().max_body_bytes == int(env_example()["MUSICGEN_MAX_BODY_BYTES"])


def test_nginx_read_timeout_exceeds_any_keepalive_interval():
    timeout = int(nginx_directive("proxy_read_timeout").removesuffix("s"))
    with pytest.raises(ConfigError):
        Settings(keepalive_seconds=timeout)  # the app refuses a keep-alive interval this long


def test_env_example_names_only_real_settings_and_loads():
    env = env_example()
    fields = {f"MUSICGEN_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert {k for k in env if k.startswith("MUSICGEN_")} <= fields
    Settings.from_env(env)
