"""docker-compose.yml and the files it mounts: the stack parses, every clipstream command
in it is a real command, replicas can be scaled, and Prometheus and Grafana are wired to
the processes and to each other. With a compose binary, `docker compose config` too."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from clipstream.streams.ops.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
CLIPSTREAM = {n: s for n, s in SERVICES.items() if (s.get("command") or [""])[0] == "clipstream"}


def test_compose_file_is_valid_and_commands_exist() -> None:
    assert {"kafka", "worker", "prometheus", "grafana"} <= set(SERVICES)
    assert any(name.startswith("replica") for name in SERVICES)
    runner = CliRunner()
    for name, service in CLIPSTREAM.items():
        # --help on the exact sub-command proves the command and its options exist
        result = runner.invoke(main, [*service["command"][1:], "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert service["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert service["environment"]["CLIPSTREAM_METRICS_PORT"] == "9400"
        assert service["image"] and service["depends_on"]["kafka"]["condition"] == "service_healthy"
        # model files come from the cluster (models/control/artifacts.py), not from a shared disk
        assert "volumes" not in service, name
        assert service["environment"]["CLIPSTREAM_ARTIFACT_CACHE"].startswith("/tmp/")
    for service in SERVICES.values():
        assert "image" in service, service
        for volume in service.get("volumes", []):
            assert (ROOT / volume.split(":")[0]).exists(), volume


def test_kafka_runs_in_kraft_mode() -> None:
    env = SERVICES["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"  # topics are created explicitly


def test_replicas_can_be_scaled() -> None:
    replicas = [n for n in CLIPSTREAM if n.startswith("replica")]
    assert replicas
    for name in replicas:
        # a fixed container name or host port would make `--scale name=3` fail
        assert "container_name" not in SERVICES[name], name
        assert "ports" not in SERVICES[name], name
    assert SERVICES["worker"]["command"][-2:] == ["--web-port", "6066"]
    assert "6066:6066" in SERVICES["worker"]["ports"]


def test_prometheus_scrapes_every_process_and_grafana_reads_prometheus() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    scraped = {
        (n, sd["port"])
        for job in prometheus["scrape_configs"]
        for sd in job["dns_sd_configs"]
        for n in sd["names"]
    }
    assert scraped == {(n, 9400) for n in CLIPSTREAM}
    urls = CLIPSTREAM["worker"]["environment"]["CLIPSTREAM_METRICS_URLS"].split(",")
    assert sorted(urls) == sorted(f"{n}:9400" for n in CLIPSTREAM)  # clipstream status sees all

    grafana = SERVICES["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "clipstream.yml").read_text())[
        "providers"
    ]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/clipstream.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}


def has_compose() -> bool:
    if not shutil.which("docker"):
        return False
    probe = ["docker", "compose", "version"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(
    not has_compose(),
    reason="no docker compose binary here; the checks above parse the file instead",
)
def test_docker_compose_config_accepts_the_file() -> None:
    run = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
