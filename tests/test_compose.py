"""compose.yaml and the image, checked without a Docker engine: Docker Compose's own `config`
(the Compose specification, interpolation), hadolint, and what the files say."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aigc.schemas.settings import Settings

from conftest import REPO, need

COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
SERVICES = COMPOSE["services"]
AIGC = [name for name, s in SERVICES.items() if s.get("image") == "aigc:latest"]


def test_expected_services_exist():
    assert {"redis", "postgres", "flower", "migrate", "sweeper", "worker-cpu", "producer", "api"} <= set(SERVICES)
    assert any(name.startswith("worker-gpu") for name in SERVICES)
    assert SERVICES["producer"]["restart"] == "no" and "producer" in SERVICES["producer"]["profiles"]
    assert "cpu" in SERVICES["worker-cpu"]["profiles"]


# What base64 secrets look like, and every character a URL or a config file cares about.
NASTY = 'Zm9v/YmFy+cQ==@:%"\\ $x`y\'z'
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    need(name, None if found else FileNotFoundError(f"{name} is not installed (pip install -e '.[dev]')"))
    return found


def compose_config(**env: str) -> dict:
    """`docker-compose config`: validated against the Compose spec and interpolated as `up` would."""
    done = subprocess.run([tool("docker-compose"), "-f", str(REPO / "compose.yaml"), "--profile", "cpu",
                           "--profile", "producer", "config", "--format", "json"],
                          env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env},
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    # Its output is a compose file again, so a literal "$" comes back escaped as "$$".
    return json.loads(done.stdout, object_hook=lambda d: {k: v.replace("$$", "$") if isinstance(v, str) else v
                                                          for k, v in d.items()})


API_KEYS = "ops:" + "0" * 64  # NAME:SHA256HEX, as `aigc keys new` prints one
SECRETS = {"REDIS_PASSWORD": NASTY, "POSTGRES_PASSWORD": NASTY[::-1], "AIGC_FLOWER_PASSWORD": "fl-" + NASTY,
           "AIGC_API_KEYS": API_KEYS}


def test_compose_validates_and_any_password_reaches_every_service_intact():
    from kombu import Connection
    from sqlalchemy.engine import make_url

    config = compose_config(**SECRETS)
    for name in AIGC:
        environment = config["services"][name]["environment"]
        settings = Settings.model_validate({k.removeprefix("AIGC_").lower(): v for k, v in environment.items()
                                            if k.startswith("AIGC_")})
        assert Connection(settings.broker_url).password == NASTY
        assert (Connection(settings.broker_url).hostname, make_url(settings.database_url).host) == ("redis", "postgres")
        assert make_url(settings.database_url).password == NASTY[::-1]
        assert NASTY not in settings.broker_url  # percent-encoded in the URL the project builds
    assert config["services"]["redis"]["environment"]["REDIS_PASSWORD"] == NASTY
    missing = subprocess.run([tool("docker-compose"), "-f", str(REPO / "compose.yaml"), "config"], cwd=REPO,
                             env={"PATH": os.environ["PATH"], "AIGC_API_KEYS": API_KEYS},
                             capture_output=True, text=True, timeout=60)
    assert re.search(r"required variable [A-Z_]+_PASSWORD is missing a value", missing.stderr), missing.stderr
    keyless = subprocess.run([tool("docker-compose"), "-f", str(REPO / "compose.yaml"), "config"], cwd=REPO,
                             env={"PATH": os.environ["PATH"], **{k: v for k, v in SECRETS.items()
                                                                 if k != "AIGC_API_KEYS"}},
                             capture_output=True, text=True, timeout=60)
    assert "required variable AIGC_API_KEYS is missing a value" in keyless.stderr, keyless.stderr


def test_no_password_on_any_command_line():
    config = compose_config(**SECRETS)
    for name, service in config["services"].items():
        argv = [*(service.get("entrypoint") or []), *(service.get("command") or []),
                *((service.get("healthcheck") or {}).get("test") or [])]
        for secret in SECRETS.values():
            assert secret not in " ".join(argv), name
        assert "-a" not in argv and "--requirepass" not in argv, name


def test_the_redis_start_script_runs_a_real_redis_with_the_password_off_its_command_line(tmp_path):
    import redis

    from test_faults import free_port

    port = free_port()
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": NASTY, "REDIS_CONF": str(tmp_path / "redis.conf")}
    need("redis-server", None if shutil.which("redis-server") else FileNotFoundError("no redis-server"))
    server = subprocess.Popen(["sh", str(REPO / "scripts" / "redis-start.sh"), "--port", str(port), "--bind",
                               "127.0.0.1", "--dir", str(tmp_path), "--save", ""], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, password=NASTY, socket_connect_timeout=1)
        for _ in range(100):
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                server.poll() is None or pytest.fail("redis-server exited")
                subprocess.run(["sleep", "0.05"])
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password=NASTY + "x").ping()
        assert NASTY.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert b"REDIS_PASSWORD" not in Path(f"/proc/{server.pid}/environ").read_bytes()
        assert oct((tmp_path / "redis.conf").stat().st_mode & 0o777) == "0o600"
    finally:
        server.terminate()
        server.wait(20)


def test_workers_and_sweeper_are_healthchecked_named_stably_and_given_time_to_wind_down():
    from aigc.schemas.settings import Settings

    config = compose_config(**SECRETS)
    workers = {n: s for n, s in config["services"].items() if n.startswith("worker-")}
    names = []
    for name, service in workers.items():
        command = service["command"]
        node = command[command.index("--hostname") + 1]
        assert service["healthcheck"]["test"][:3] == ["CMD", "aigc", "ping"]
        assert service["healthcheck"]["test"][3] == node  # pings itself, by its own node name
        assert service["hostname"], name  # %h is the service's hostname, not a container id
        names.append(node.replace("%h", service["hostname"]))
        grace = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", service["stop_grace_period"])
        seconds = sum(int(n or 0) * unit for n, unit in zip(grace.groups(), (3600, 60, 1)))
        # the rows in flight finish within AIGC_SHUTDOWN_GRACE_SECONDS, then the rest is handed back
        assert seconds >= Settings().shutdown_grace_seconds + 30, service["stop_grace_period"]
    assert len(set(names)) == len(names)
    assert "alive-file" in " ".join(config["services"]["sweeper"]["command"])
    assert "healthcheck" in config["services"]["sweeper"]


def test_flower_and_the_api_are_published_on_loopback_only():
    config = compose_config(**SECRETS)
    for name, target in (("flower", 5555), ("api", 8000)):
        (port,) = config["services"][name]["ports"]
        assert port["host_ip"] == "127.0.0.1" and port["target"] == target


def test_the_dockerfile_passes_hadolint_and_builds_a_sensible_image():
    linted = subprocess.run([tool("hadolint"), "--no-color", str(REPO / "scripts" / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0 and not linted.stdout.strip(), linted.stdout
    lines = [line.strip() for line in (REPO / "scripts" / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    first_code = next(i for i, line in enumerate(lines) if line.startswith("COPY workers"))
    deps = next(i for i, line in enumerate(lines) if "--requirement requirements.txt" in line)
    assert deps < first_code  # a code edit leaves the dependency layer cached
    assert "--constraint constraints.txt" in lines[deps]
    pins = [line for line in (REPO / "scripts" / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=]+", pin) for pin in pins), pins


def test_dockerignore_sends_the_code_and_not_the_checkout():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # everything out, then the few things the image needs back in
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for line in (REPO / "scripts" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied |= set(line.split()[1:-1])
    assert {c.rstrip("/") for c in copied} <= allowed
    assert not any(p in allowed for p in (".venv", ".git", "tests", ".aigc"))


def test_each_gpu_worker_reserves_one_device_and_pins_to_it():
    gpu_workers = {n: s for n, s in SERVICES.items() if n.startswith("worker-gpu")}
    seen = set()
    for name, service in gpu_workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        (index,) = device["device_ids"]
        seen.add(index)
        command = service["command"]
        assert command[:2] == ["aigc", "worker"]
        # the one reserved GPU is device 0 inside the container; the node name says which
        assert command[command.index("--devices") + 1] == "0"
        assert command[command.index("--hostname") + 1] == f"gpu{index}@%h" == f"{name.removeprefix('worker-')}@%h"
    assert len(seen) == len(gpu_workers)


def test_every_aigc_variable_is_a_setting():
    fields = {f"AIGC_{name.upper()}" for name in Settings.model_fields}
    used = set()
    for name in AIGC:
        used |= {k for k in SERVICES[name].get("environment", {}) if k.startswith("AIGC_")}
    used |= set(re.findall(r"\$\{(AIGC_[A-Z_]+)", (REPO / "compose.yaml").read_text()))
    assert used and used <= fields, used - fields


def test_state_is_on_volumes_and_services_wait_for_health():
    declared = set(COMPOSE["volumes"])
    for service in SERVICES.values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith("./") or source in declared, mount
    for name in ("redis", "postgres"):
        assert "healthcheck" in SERVICES[name]
    for name in AIGC:
        depends = SERVICES[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        if name != "migrate":
            assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_secrets_are_required_and_redis_persists():
    redis_command = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert SERVICES["redis"]["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    env = SERVICES["flower"]["environment"]
    assert env["AIGC_FLOWER_PASSWORD"].startswith("${AIGC_FLOWER_PASSWORD:?")
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    assert env["AIGC_BROKER_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert SERVICES["api"]["environment"]["AIGC_API_KEYS"].startswith("${AIGC_API_KEYS:?")
    assert "--open" not in SERVICES["api"]["command"]
    for name in AIGC:
        built = Settings.model_validate({k.removeprefix("AIGC_").lower(): v for k, v in
                                         SERVICES[name]["environment"].items() if k.startswith("AIGC_")
                                         and "${" not in v})
        assert built.data_dir == Path("/data")


@pytest.mark.parametrize("name", ["migrate", "flower", "sweeper", "worker-cpu", "worker-gpu0", "api"])
def test_commands_are_real_cli_commands(name):
    from typer.main import get_command

    from aigc.cli import app

    command = SERVICES[name]["command"]
    assert command[0] == "aigc" and command[1] in get_command(app).commands
    check = (SERVICES[name].get("healthcheck") or {}).get("test", [])
    if check[1:2] == ["aigc"]:
        assert check[2] in get_command(app).commands
