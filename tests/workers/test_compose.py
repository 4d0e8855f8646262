"""docker-compose.yml: valid for Debian's docker-compose, and shaped as the README says."""

from __future__ import annotations

import shutil
import subprocess
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
EXPERT_SERVICES = ("detect", "segment", "generate", "edit")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def served_experts(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    if isinstance(cmd, str):
        cmd = cmd.split()
    if cmd[:2] != ["switchboard", "worker"] or "--experts" not in cmd:
        return []
    return cmd[cmd.index("--experts") + 1].split(",")


@pytest.mark.integration
def test_docker_compose_config_is_valid() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose not found; install it: apt-get install -y docker-compose (make system-deps)")
    proc = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    profiles = subprocess.run([binary, "-f", str(COMPOSE), "--profile", "monitoring", "config", "--services"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert profiles.returncode == 0, profiles.stderr
    assert "flower" in profiles.stdout.split()
    multi_gpu = REPO / "docker" / "compose.multi-gpu.example.yml"
    proc = subprocess.run([binary, "-f", str(COMPOSE), "-f", str(multi_gpu), "config", "-q"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_redis_is_durable_and_healthchecked(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    cmd = [str(x) for x in redis["command"]]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_one_gpu_service_per_expert(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in EXPERT_SERVICES:
        svc = services[name]
        assert served_experts(svc) == [name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "container_name" not in svc and "ports" not in svc  # so --scale works


def test_every_builtin_expert_is_served(compose: dict[str, Any]) -> None:
    served = {e for svc in compose["services"].values() for e in served_experts(svc)}
    builtins = {ep.name for ep in entry_points(group="switchboard.experts")
                if ep.dist is not None and ep.dist.name == "switchboard"}
    assert builtins <= served, f"experts without a worker service: {sorted(builtins - served)}"


def test_orchestrator_and_workers_share_the_artifact_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("orchestrator", *EXPERT_SERVICES):
        svc = services[name]
        assert "artifacts:/data/artifacts" in svc["volumes"]
        assert svc["environment"]["SWITCHBOARD_ARTIFACT_DIR"] == "/data/artifacts"
        assert svc["environment"]["SWITCHBOARD_BROKER_URL"] == "redis://redis:6379/0"
    assert services["orchestrator"]["command"][:2] == ["switchboard", "serve"]
    assert "artifacts" in compose["volumes"]


def test_flower_is_a_monitoring_profile(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["profiles"] == ["monitoring"]
    assert "flower" in flower["command"]
