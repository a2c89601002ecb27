"""The config template (every key of every settings model), ``dualwrite config init|check``, and
"did you mean" for misspelled keys and variables."""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner, Result

from dualwrite.cli import app
from dualwrite.config import Settings, model_of
from dualwrite.config_template import (
    REGENERATE,
    REPOSITORY_COPY,
    packaged_template,
    render_template,
)
from dualwrite.exceptions import ConfigError
from dualwrite.models import Stage
from tests.support import STRIPE_KEY, ScenarioBuilder

pytestmark = pytest.mark.usefixtures("clean_environment")

ROOT = Path(__file__).resolve().parents[2]
_EXAMPLE_LINE = re.compile(r"^# (\[|[a-z_]+ = )")


def uncommented(text: str) -> str:
    """The template with its commented-out keys and example tables switched on."""
    return "\n".join(line[2:] if _EXAMPLE_LINE.match(line) else line for line in text.splitlines())


def missing_keys(data: dict[str, Any], model: type[BaseModel], where: str) -> list[str]:
    """Every field of ``model`` (and of the models inside it) that ``data`` lacks."""
    missing = []
    for name, field in model.model_fields.items():
        if model is Settings and field.validation_alias:
            continue  # secrets: environment only, named in the header
        if name not in data:
            missing.append(f"{where}{name}")
            continue
        inner = model_of(field.annotation)
        value = data[name]
        if inner is None or not isinstance(value, dict | list):
            continue  # a plain value (a route's field source is written as "kind:name")
        if isinstance(value, list):
            tables = value
        elif model is Settings and name == "items":
            tables = list(value.values())  # [items.<si>]: a map of tables
        else:
            tables = [value]
        for table in tables:
            missing += missing_keys(table, inner, f"{where}{name}.")
    return missing


class TestTemplate:
    """The template holds every key, and both shipped copies are what the models give now."""

    def test_shipped_copies_are_generated_from_the_models(self):
        """The packaged template and config/dualwrite.toml equal render_template()."""
        expected = render_template()
        hint = f"the config template is stale: run `{REGENERATE}` and commit both files"
        assert packaged_template() == expected, hint
        assert (ROOT / REPOSITORY_COPY).read_text(encoding="utf-8") == expected, hint

    def test_every_key_of_every_model_is_in_it(self):
        """Parsed back (examples switched on), the template names every key of every model."""
        data = tomllib.loads(uncommented(packaged_template()))
        missing = missing_keys(data, Settings, "")
        assert missing == [], (
            f"keys missing from the config template: {missing}; run `{REGENERATE}`"
        )

    def test_examples_are_valid_settings(self, tmp_path: Path):
        """With its examples switched on the template loads, meters, routes and items included."""
        path = tmp_path / "all.toml"
        path.write_text(uncommented(packaged_template()), encoding="utf-8")
        settings = Settings.load(path)
        assert [meter.event_name for meter in settings.meters] == ["api_requests"]
        assert settings.routes[0].path == "/api/usage/{customer}"
        assert settings.items["si_Example"].customer == "cus_Example"

    def test_the_template_alone_is_the_defaults(self, tmp_path: Path):
        """The template as written changes nothing: it loads to the defaults."""
        path = tmp_path / "dualwrite.toml"
        path.write_text(packaged_template(), encoding="utf-8")
        assert Settings.load(path).model_dump() == Settings.load().model_dump()


class TestUnknownKeys:
    """A misspelled key names the closest real one; no close one, the section's keys."""

    def load_error(self, tmp_path: Path, text: str) -> str:
        """The ConfigError message for a file holding ``text``."""
        path = tmp_path / "dualwrite.toml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            Settings.load(path)
        return str(info.value)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ('[redis]\nurll = "redis://x"\n', "redis.urll: no such key; fix: did you mean 'url'?"),
            ("[outbox]\nblock_msec = 5\n", "did you mean 'block_ms'?"),
            ('[[meters]]\nevent_name = "a"\nset_polcy = "refuse"\n', "did you mean 'set_policy'?"),
            (
                '[items.si_1]\ncustomer = "cus_1"\nevent_name = "a"\ncustomr = "x"\n',
                "items.si_1.customr: no such key; fix: did you mean 'customer'?",
            ),
            ('[redsi]\nurl = "x"\n', "redsi: no such key; fix: did you mean 'redis'?"),
        ],
    )
    def test_did_you_mean(self, tmp_path: Path, text: str, expected: str):
        """The message names the key, says it does not exist, and the closest real one."""
        assert expected in self.load_error(tmp_path, text)

    def test_no_close_key_lists_the_section(self, tmp_path: Path):
        """Nothing close: the fix lists the section's keys, and points at something that exists."""
        message = self.load_error(tmp_path, "[flags]\nzzz = 1\n")
        assert "the keys of [flags] are safe_stage, cache_ttl, rollout_salt" in message
        assert "config/dualwrite.toml" not in message
        message = self.load_error(tmp_path, "[redis.tls]\nverify = true\n")
        assert "redis.tls: no such key" in message
        assert "the keys of [redis] are url, key_prefix" in message

    def test_stage_names_in_any_case(self, tmp_path: Path):
        """safe_stage = "Shadow" is the shadow stage."""
        path = tmp_path / "dualwrite.toml"
        path.write_text('[flags]\nsafe_stage = "Shadow"\n', encoding="utf-8")
        assert Settings.load(path).flags.safe_stage is Stage.SHADOW


# ------------------------------------------------------------------------------------- commands


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Runs ``dualwrite ARGS`` in a scratch directory with the given environment."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str, **env: str) -> Result:
        return runner.invoke(app, list(args), env={"COLUMNS": "200", **env})

    return invoke


def flat(result: Result) -> str:
    """The output on one line."""
    return " ".join(result.output.split())


class TestInit:
    """``config init`` writes the template, and never over a file without --force."""

    def test_writes_the_template(self, run, tmp_path: Path):
        """init writes dualwrite.toml, which is the packaged template and loads."""
        result = run("config", "init")
        assert result.exit_code == 0, result.output
        assert "wrote dualwrite.toml" in flat(result)
        written = (tmp_path / "dualwrite.toml").read_text(encoding="utf-8")
        assert written == packaged_template()
        Settings.load(tmp_path / "dualwrite.toml")

    def test_refuses_to_overwrite(self, run, tmp_path: Path):
        """An existing file is kept unless --force."""
        (tmp_path / "mine.toml").write_text("# mine\n", encoding="utf-8")
        result = run("config", "init", "mine.toml")
        assert result.exit_code == 1 and "--force" in flat(result)
        assert (tmp_path / "mine.toml").read_text(encoding="utf-8") == "# mine\n"
        assert run("config", "init", "mine.toml", "--force").exit_code == 0
        assert (tmp_path / "mine.toml").read_text(encoding="utf-8") == packaged_template()

    def test_dash_prints_it(self, run):
        """init - prints the template."""
        result = run("config", "init", "-")
        assert result.exit_code == 0 and result.output == packaged_template()


class TestCheck:
    """``config check``: validates, tries Redis and Stripe read-only, exit 0 or 1."""

    @pytest.fixture
    def env(self, redis_url: str, key_prefix: str, standin_url: str) -> dict[str, str]:
        """A working environment: the test Redis and the stand-in, with its key."""
        return {
            "DUALWRITE_REDIS__URL": redis_url,
            "DUALWRITE_REDIS__KEY_PREFIX": key_prefix,
            "DUALWRITE_STRIPE__API_BASE": standin_url,
            "STRIPE_API_KEY": STRIPE_KEY,
        }

    def test_everything_usable(self, run, env, tmp_path: Path, standin_url: str):
        """A valid file, Redis answering, Stripe answering with the meter: exit 0, all said."""

        async def create_meter() -> str:
            async with ScenarioBuilder(standin_url, STRIPE_KEY) as builder:
                return (await builder.customer()).meter

        meter = asyncio.run(create_meter())
        path = tmp_path / "dualwrite.toml"
        path.write_text('[[meters]]\nevent_name = "api_requests"\n', encoding="utf-8")
        result = run("config", "check", "-c", str(path), **env)
        output = flat(result)
        assert result.exit_code == 0, output
        assert f"config file: {path}" in output
        assert "ok settings: valid" in output
        assert "ok redis:" in output and "answers (Redis" in output
        assert "ok stripe:" in output and "(test mode)" in output
        assert f"ok meter api_requests: in Stripe ({meter})" in output
        assert STRIPE_KEY not in result.output
        assert "everything checked is usable" in output

    def test_json(self, run, env):
        """--json prints the same findings as data."""
        result = run("config", "check", "--json", **env)
        assert result.exit_code == 0, result.output
        assert '"name": "redis"' in result.output and '"ok": true' in result.output

    def test_missing_key_and_missing_meter(self, run, env, tmp_path: Path):
        """No STRIPE_API_KEY is a problem with its fix; so is a configured meter Stripe lacks."""
        without_key = {name: value for name, value in env.items() if name != "STRIPE_API_KEY"}
        result = run("config", "check", **without_key)
        assert result.exit_code == 1
        assert "problem stripe: STRIPE_API_KEY is not set fix: export STRIPE_API_KEY" in flat(
            result
        )
        path = tmp_path / "dualwrite.toml"
        path.write_text('[[meters]]\nevent_name = "nowhere"\n', encoding="utf-8")
        result = run("-c", str(path), "config", "check", **env)
        assert result.exit_code == 1
        assert "problem meter nowhere: no meter with this event name" in flat(result)
        assert "`dualwrite meters plan`" in flat(result)

    def test_misspelled_variable(self, run, env):
        """A DUALWRITE_ variable that sets nothing is a problem naming the closest real one."""
        result = run("config", "check", DUALWRITE_REDIS_URL="redis://x:1/0", **env)
        assert result.exit_code == 1
        assert (
            "problem DUALWRITE_REDIS_URL: sets nothing fix: did you mean DUALWRITE_REDIS__URL?"
            in flat(result)
        )

    def test_invalid_file_and_dead_redis(self, run, env, tmp_path: Path):
        """An invalid file is a problem (and nothing is tried); so is a Redis that is down."""
        path = tmp_path / "bad.toml"
        path.write_text("[redis]\nshards = 0\n", encoding="utf-8")
        result = run("config", "check", "--config", str(path), **env)
        assert result.exit_code == 1 and "redis.shards = 0" in flat(result)
        dead = {
            **env,
            "DUALWRITE_REDIS__URL": "redis://:s3cret@127.0.0.1:1/0",
            "DUALWRITE_REDIS__CONNECT_TIMEOUT": "0.2",
        }
        result = run("config", "check", **dead)
        assert result.exit_code == 1
        assert "problem redis: redis://****@127.0.0.1:1/0 does not answer" in flat(result)
        assert "s3cret" not in result.output
