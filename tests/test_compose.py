"""compose.yaml, checked without a Docker engine: services, volumes, GPUs, settings, auth."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from schemas.settings import Settings

from conftest import REPO

COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
SERVICES = COMPOSE["services"]
AIGC = [name for name, s in SERVICES.items() if s.get("image") == "aigc:latest"]


def test_expected_services_exist():
    assert {"redis", "postgres", "flower", "migrate", "sweeper", "worker-cpu", "producer", "api"} <= set(SERVICES)
    assert any(name.startswith("worker-gpu") for name in SERVICES)
    assert SERVICES["producer"]["restart"] == "no" and "producer" in SERVICES["producer"]["profiles"]
    assert "cpu" in SERVICES["worker-cpu"]["profiles"]


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
    assert "--appendonly yes" in redis_command and "--requirepass ${REDIS_PASSWORD:?" in redis_command
    env = SERVICES["flower"]["environment"]
    assert env["AIGC_FLOWER_PASSWORD"].startswith("${AIGC_FLOWER_PASSWORD:?")
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    assert ":${REDIS_PASSWORD:?" in env["AIGC_BROKER_URL"]
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

    from producer.cli import app

    command = SERVICES[name]["command"]
    assert command[0] == "aigc" and command[1] in get_command(app).commands
