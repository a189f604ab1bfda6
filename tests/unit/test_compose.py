"""docker-compose.yml parses, and every service command is a real clipstream command."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from streams.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_is_valid_and_commands_exist() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "worker", "prometheus"} <= set(services)
    assert any(name.startswith("replica") for name in services)
    runner = CliRunner()
    for name, service in services.items():
        command = service.get("command")
        if not command or command[0] != "clipstream":
            continue
        # --help on the exact sub-command proves the command and its options exist
        result = runner.invoke(main, [*command[1:], "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert service["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    for volume in services["prometheus"]["volumes"]:
        source = volume.split(":")[0]
        assert (ROOT / source).is_file(), source
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    scraped = {
        n
        for job in prometheus["scrape_configs"]
        for sd in job["dns_sd_configs"]
        for n in sd["names"]
    }
    assert scraped == {n for n in services if n == "worker" or n.startswith("replica")}
