"""`make demo` shows only its own progress and the summary line (issue 13): no librdkafka
lines (a fresh broker's "Coordinator load in progress", refused connections at shutdown),
no tracebacks, nothing from the worker or the replicas, whose logs go to files without
Faust's cursor escape codes. Run as `make demo` runs it: `clipstream demo` with no cluster
configured, so it starts and stops its own broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from clipstream.streams.runtime.processes import clipstream_command

pytestmark = pytest.mark.integration

# everything the demo itself says on stderr; rich draws its progress bars once at the end
# when stderr is not a terminal
OWN_LINES = [
    r"starting the embedded Kafka broker \(first run resolves its jars\) \.\.\.",
    r"training digits models, served as ONNX \.\.\.",
    r"  digits-(logreg|forest|svc) +offline accuracy 0\.\d{3}",
    r"waiting for the worker and replicas to serve \.\.\.",
    r"(queries sent|predictions) +━+ 540/540 \d+:\d\d:\d\d",
    r"logs and models in \S+",
]


@pytest.mark.timeout(600)
def test_the_demo_prints_its_progress_and_one_summary_line(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    demo = subprocess.Popen(
        clipstream_command("demo", "--workdir", str(tmp_path / "demo")),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = demo.communicate(timeout=500)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)  # it stops its processes and broker on SIGTERM
            demo.communicate(timeout=90)
    assert demo.returncode == 0, err
    assert re.fullmatch(
        r"demo: queries=540 predictions=540 accuracy=0\.\d{3} p50_ms=[\d.]+ p99_ms=[\d.]+ "
        r"defaults=\d+ lost=0\n",
        out,
    ), out
    strangers = [
        line for line in err.splitlines() if not any(re.fullmatch(p, line) for p in OWN_LINES)
    ]
    assert strangers == [], err
    for log in (tmp_path / "demo" / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert "\x1b[" not in text, f"escape codes in {log.name}"
        assert "Traceback" not in text, text
