"""deploy/: the Prometheus alert rules pass ``promtool check rules`` and their own ``promtool test
rules``, and every metric the rules and the Grafana dashboard use is exported by a running worker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.observability.test_logging import base_env, dualwrite_process, free_port, wait_for

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dualwrite.json"
_METRIC = re.compile(r"\bdualwrite_[a-z0-9_]+\b")
_NO_PROMTOOL = (
    "promtool is not installed: it comes with Debian's prometheus package "
    "(apt-get install prometheus; .ci/run installs it when it is missing)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool (failing the test, never skipping it, when it is missing)."""
    if shutil.which("promtool") is None:
        pytest.fail(_NO_PROMTOOL, pytrace=False)
    return subprocess.run(
        ["promtool", *args], cwd=ALERTS.parent, capture_output=True, text=True, timeout=120
    )


def rule_metrics() -> set[str]:
    """The metric names in the alert rules' expressions."""
    names: set[str] = set()
    for line in ALERTS.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("expr:"):
            names |= set(_METRIC.findall(line))
    return names


def dashboard_metrics() -> set[str]:
    """The metric names in the dashboard's queries."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in _METRIC.findall(target["expr"])
    }


def exported(text: str) -> set[str]:
    """Every series name a /metrics answer can hold, empty families included."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "counter":
                names |= {name.removesuffix("_total") + "_total"}
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


class TestAlertRules:
    """promtool accepts the rules, and their unit tests pass."""

    def test_check_rules(self):
        """`promtool check rules alerts.yml` succeeds."""
        result = promtool("check", "rules", ALERTS.name)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rule_unit_tests(self):
        """`promtool test rules alerts.test.yml`: each alert fires when it should, not before."""
        result = promtool("test", "rules", ALERT_TESTS.name)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_every_alert_is_unit_tested(self):
        """Each alert of alerts.yml is named in alerts.test.yml."""
        alerts = set(re.findall(r"- alert: (\w+)", ALERTS.read_text(encoding="utf-8")))
        tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text(encoding="utf-8")))
        assert alerts and alerts <= tested, alerts - tested


class TestDashboard:
    """The Grafana dashboard is well formed: every panel titled, queried, placed once."""

    def test_panels(self):
        """Unique ids; each panel has a title, a Prometheus query and a position."""
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)) > 0
        for panel in dashboard["panels"]:
            assert panel["title"] and panel["targets"] and panel["gridPos"]["w"] > 0
            assert all(target["expr"].strip() for target in panel["targets"])


@pytest.mark.slow  # a process start on a loaded 2-core machine: 3-5 s
def test_every_metric_used_is_exported_by_a_worker(redis_url, key_prefix, tmp_path: Path):
    """Every metric name of the rules and the dashboard is in a running worker's /metrics."""
    port = free_port()
    env = base_env(redis_url, key_prefix)
    with dualwrite_process(["worker", "--metrics-port", str(port)], env, tmp_path):
        answer = wait_for(f"http://127.0.0.1:{port}/metrics", {})
    assert answer.status_code == 200
    names = exported(answer.text)
    used = rule_metrics() | dashboard_metrics()
    assert len(used) > 10
    missing = sorted(used - names)
    assert missing == [], f"used by deploy/ but not exported: {missing}"
