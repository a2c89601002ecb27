"""The documentation: the site builds with ``mkdocs build --strict`` (broken links, anchors and
pages left out of the navigation fail it), its generated reference pages hold every key, command
and admin operation, the README stays short, and every section the README used to hold lives on
in a page. The code blocks that are whole programs are the ``examples/`` files, run by
``tests/middleware/test_examples.py``, which also checks that each block equals its file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dualwrite.admin import DEFAULT_ENDPOINTS
from dualwrite.config_template import config_tables, environment_only

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README_MAX_LINES = 250

#: Every section heading of the README before the documentation site, and the page holding it now
#: (by the same title, so that edits made to a README section elsewhere can be carried over).
FORMER_README_SECTIONS = {
    "Other Python apps": "other-apps.md",
    "The direct API: `SyncRecorder` and `Recorder`": "other-apps.md",
    "Flask and Django (WSGI)": "other-apps.md",
    "Celery, RQ and other workers": "other-apps.md",
    "Code that calls the Stripe SDK": "other-apps.md",
    "What it does": "index.md",
    "The middleware in a Starlette or FastAPI app": "middleware.md",
    "The proxy in five minutes": "proxy.md",
    "What the caller sees": "proxy.md",
    "Safety": "proxy.md",
    "Stages and flags": "flags.md",
    "Cutover operations": "cutover.md",
    "The admin API": "admin-api.md",
    "Creating the meters, and replaying past usage": "meters.md",
    "Identifiers, idempotency and timestamps": "identifiers.md",
    "Delivery: the outbox": "delivery.md",
    "The report": "report.md",
    "Reconciliation": "report.md",
    "The report page": "report.md",
    "Metrics, logs and OpenFeature": "operations/monitoring.md",
    "Configuration": "configuration.md",
    "The Stripe stand-in": "testing.md",
    "Benchmarks": "benchmarks.md",
    "The middleware on other routes (`bench/passthrough.py`)": "benchmarks.md",
    "Usage routes (`bench/usage_routes.py`)": "benchmarks.md",
    "WSGI and the direct API (`bench/wsgi.py`)": "benchmarks.md",
    "The proxy hop (`bench/proxy_overhead.py`)": "benchmarks.md",
    "Stripe client CPU per call (`bench/stripe_client.py`)": "benchmarks.md",
    "Delivery to meter events (`bench/delivery.py`)": "benchmarks.md",
    "The report over 100,000 customers (`bench/report.py`)": "benchmarks.md",
    "Flags": "benchmarks.md",
    "Deployment": "operations/deployment.md",
    "Where state lives": "operations/state.md",
    "Testing the money path": "testing.md",
    "Reliability and security": "reliability.md",
    "Limits": "limits.md",
}


def headings(path: Path) -> set[str]:
    """The headings of a Markdown file (outside code blocks)."""
    found: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            found.add(match[1].strip())
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for the module with ``mkdocs build --strict``."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(target)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about its future
    )
    if "No module named mkdocs" in result.stderr:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]'", pytrace=False)
    assert result.returncode == 0, result.stderr
    return target


class TestSite:
    """``mkdocs build --strict`` and the generated reference."""

    def test_builds_strict(self, site):
        """The build passes strict mode (no broken link or anchor, every page in the nav)."""
        assert (site / "index.html").is_file()
        assert (site / "operations" / "health" / "index.html").is_file()

    def test_config_reference_holds_every_key(self, site):
        """Every key of every settings table, and every environment-only value, is on the
        configuration reference page."""
        page = (site / "reference" / "config" / "index.html").read_text(encoding="utf-8")
        for table in config_tables():
            for key, _ in table.keys:
                assert f"<code>{key}</code>" in page, (table.header, key)
        for variable, _ in environment_only():
            assert f"<code>{variable}</code>" in page

    def test_cli_reference_holds_every_command(self, site):
        """Every command and subcommand of ``dualwrite`` has its section, with its options."""
        page = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
        for command in ("dualwrite serve", "dualwrite worker", "dualwrite flags set", "dead retry"):
            assert command in page, command
        assert "--metrics-port" in page and "--with-schedule" in page

    def test_admin_reference_holds_every_operation(self, site):
        """Every operation of the admin API is on its reference page."""
        page = (site / "reference" / "admin-api" / "index.html").read_text(encoding="utf-8")
        for endpoint in DEFAULT_ENDPOINTS:
            assert f"{endpoint.method.upper()} {endpoint.path}" in page, endpoint.path


class TestReadme:
    """The README is the front page: short, and nothing it held is lost."""

    def test_under_the_line_limit(self):
        """The README stays under 250 lines."""
        lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
        assert len(lines) < README_MAX_LINES, len(lines)

    def test_former_sections_live_in_the_docs(self):
        """Every section the README used to hold is a heading of its docs page."""
        for title, page in FORMER_README_SECTIONS.items():
            assert title in headings(DOCS / page), (title, page)

    def test_readme_links_reach_pages(self):
        """Every ``docs/…`` link of the README names a page that exists."""
        readme = (REPO / "README.md").read_text(encoding="utf-8")
        links = re.findall(r"\]\((docs/[^)#]+)", readme)
        assert links
        for link in links:
            assert (REPO / link).is_file(), link
