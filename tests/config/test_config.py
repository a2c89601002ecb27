"""Settings: the TOML file, the environment over it, and a ConfigError naming key, value and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualwrite.config import DEFAULT_LEGACY_API_VERSION, DEFAULT_REDIS_URL, Settings
from dualwrite.exceptions import ConfigError
from dualwrite.models import Stage

pytestmark = pytest.mark.usefixtures("clean_environment")

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "config" / "dualwrite.toml"
SECRET = "sk_live_51DoNotLeakThisKeyAbcd9876"


@pytest.fixture
def write_config(tmp_path: Path):
    """Writes a TOML config file and returns its path."""

    def write(text: str) -> Path:
        path = tmp_path / "dualwrite.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def config_error(path: Path | None = None) -> str:
    """The message of the ConfigError that loading ``path`` raises."""
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    return str(info.value)


class TestFile:
    """Values come from the TOML file; without one, the defaults hold."""

    def test_example_config_loads_cleanly(self):
        """config/dualwrite.toml (the generated template) loads to the defaults: its meters,
        routes and items are commented-out examples."""
        settings = Settings.load(EXAMPLE_CONFIG)
        assert settings.redis.url == "redis://127.0.0.1:6379/0"
        assert settings.stripe.legacy_api_version == DEFAULT_LEGACY_API_VERSION
        assert settings.meters == () and settings.routes == () and settings.items == {}
        assert settings.stripe_api_key_value() is None

    def test_defaults_without_a_file(self):
        """No file and no variables: every setting has its default."""
        settings = Settings.load()
        assert settings.redis.url == DEFAULT_REDIS_URL
        assert settings.redis.key_prefix == "dualwrite" and settings.redis.shards == 1
        assert settings.flags.safe_stage is Stage.LEGACY
        assert settings.routes == () and settings.meters == ()

    def test_values_come_from_the_file(self, write_config):
        """Each section of the file lands in its settings model."""
        path = write_config(
            """
            [redis]
            url = "redis://cache:6380/2"
            key_prefix = "billing-prod"
            shards = 8
            [flags]
            safe_stage = "shadow"
            [stripe]
            api_base = "http://127.0.0.1:12111/"
            [[meters]]
            event_name = "api_requests"
            set_policy = "refuse"
            [items.si_123]
            customer = "cus_123"
            event_name = "api_requests"
            """
        )
        settings = Settings.load(path)
        assert settings.redis.url == "redis://cache:6380/2"
        assert settings.redis.key_prefix == "billing-prod" and settings.redis.shards == 8
        assert settings.flags.safe_stage is Stage.SHADOW
        assert settings.stripe.api_base == "http://127.0.0.1:12111"
        assert settings.meter("api_requests").set_policy == "refuse"
        assert settings.items["si_123"].customer == "cus_123"

    def test_dualwrite_config_variable_names_the_file(self, write_config, monkeypatch):
        """Without an argument, DUALWRITE_CONFIG points at the file."""
        path = write_config('[redis]\nkey_prefix = "from-variable"\n')
        monkeypatch.setenv("DUALWRITE_CONFIG", str(path))
        assert Settings.load().redis.key_prefix == "from-variable"


class TestEnvironment:
    """DUALWRITE_* variables win over the file; REDIS_URL is the fallback for the Redis URL."""

    def test_variables_override_the_file(self, write_config, monkeypatch):
        """DUALWRITE_<SECTION>__<KEY> beats the same key in the file; other keys stay."""
        path = write_config('[redis]\nurl = "redis://file:6379/0"\nshards = 4\n')
        monkeypatch.setenv("DUALWRITE_REDIS__URL", "redis://env:6379/1")
        monkeypatch.setenv("DUALWRITE_FLAGS__SAFE_STAGE", "primary")
        settings = Settings.load(path)
        assert settings.redis.url == "redis://env:6379/1"
        assert settings.redis.shards == 4
        assert settings.flags.safe_stage is Stage.PRIMARY

    def test_redis_url_fallback(self, monkeypatch):
        """REDIS_URL is used when neither the file nor DUALWRITE_REDIS__URL sets the URL."""
        monkeypatch.setenv("REDIS_URL", "redis://fallback:6379/3")
        assert Settings.load().redis.url == "redis://fallback:6379/3"

    def test_file_and_dualwrite_variable_beat_redis_url(self, write_config, monkeypatch):
        """REDIS_URL is only a fallback: the file's url, then DUALWRITE_REDIS__URL, win over it."""
        monkeypatch.setenv("REDIS_URL", "redis://fallback:6379/3")
        path = write_config('[redis]\nurl = "redis://file:6379/0"\n')
        assert Settings.load(path).redis.url == "redis://file:6379/0"
        monkeypatch.setenv("DUALWRITE_REDIS__URL", "redis://env:6379/1")
        assert Settings.load(path).redis.url == "redis://env:6379/1"

    def test_settings_are_frozen(self):
        """Settings are read once and cannot be changed afterwards."""
        settings = Settings.load()
        with pytest.raises(ValueError, match="frozen"):
            settings.routes = ()  # type: ignore[misc]


class TestStripeKey:
    """The Stripe key comes only from STRIPE_API_KEY, and is never shown."""

    def test_key_from_the_environment(self, monkeypatch):
        """STRIPE_API_KEY is read, kept as a secret, and absent from the repr."""
        monkeypatch.setenv("STRIPE_API_KEY", SECRET)
        settings = Settings.load()
        assert settings.stripe_api_key_value() == SECRET
        assert SECRET not in repr(settings) and SECRET not in str(settings)
        assert SECRET not in settings.model_dump_json()

    @pytest.mark.parametrize(
        "text",
        [
            f'stripe_api_key = "{SECRET}"\n',
            f'STRIPE_API_KEY = "{SECRET}"\n',
            f'[stripe]\napi_key = "{SECRET}"\n',
            f'[stripe]\nstripe_api_key = "{SECRET}"\n',
        ],
    )
    def test_key_in_the_file_is_refused(self, write_config, text):
        """A key in the file is refused with a pointer to STRIPE_API_KEY, never echoing it."""
        message = config_error(write_config(text))
        assert "STRIPE_API_KEY" in message and "holds a Stripe key" in message
        assert SECRET not in message and SECRET[-4:] not in message

    def test_key_in_a_nested_variable_is_refused_without_echo(self, monkeypatch):
        """DUALWRITE_STRIPE__API_KEY is not a setting: refused, shown as <secret>."""
        monkeypatch.setenv("DUALWRITE_STRIPE__API_KEY", SECRET)
        message = config_error()
        assert "stripe.api_key = <secret>" in message and "STRIPE_API_KEY" in message
        assert SECRET not in message

    def test_key_not_in_errors_about_other_settings(self, write_config, monkeypatch):
        """An error elsewhere (duplicate meters) does not show the key from the environment."""
        monkeypatch.setenv("STRIPE_API_KEY", SECRET)
        path = write_config('[[meters]]\nevent_name = "a"\n[[meters]]\nevent_name = "a"\n')
        message = config_error(path)
        assert "meters" in message and SECRET not in message

    def test_key_like_values_are_masked_in_errors(self, write_config):
        """A Stripe key under a wrong name is never shown (an unknown key's value is not), and a
        key-like value of a known key is masked to its last four characters."""
        message = config_error(write_config(f'[stripe]\nsecret = "{SECRET}"\n'))
        assert "stripe.secret: no such key" in message and SECRET not in message
        message = config_error(write_config(f'[redis]\nkey_prefix = "{SECRET}!"\n'))
        assert "sk_live_****9876" in message and SECRET not in message


class TestInvalidValues:
    """Every bad value is a ConfigError naming the key, the value and the fix."""

    @pytest.mark.parametrize(
        ("text", "key", "value", "fix"),
        [
            (
                '[redis]\nurl = "http://cache:6379"\n',
                "redis.url",
                "'http://cache:6379'",
                "redis://host:6379/0",
            ),
            (
                '[stripe]\nlegacy_api_version = "2025-03-31.basil"\n',
                "stripe.legacy_api_version",
                "'2025-03-31.basil'",
                "use 2025-02-24.acacia",
            ),
            (
                '[flags]\nsafe_stage = "beta"\n',
                "flags.safe_stage",
                "'beta'",
                "use one of legacy, shadow, primary, meter",
            ),
            ("[redis]\nshards = 0\n", "redis.shards", "0", "DUALWRITE_REDIS__SHARDS"),
            (
                '[redis]\nkey_prefix = "{tag}"\n',
                "redis.key_prefix",
                "'{tag}'",
                "letters, digits",
            ),
            (
                '[[routes]]\npath = "/usage"\ncustomer = "body:x"\nquantity = "json:q"\n',
                "routes.0.customer",
                "'body:x'",
                "write kind:name with kind one of path, query, json, form, header, const",
            ),
            (
                '[[routes]]\npath = "/usage"\ncustomer = "path:customer"\nquantity = "json:q"\n',
                "routes.0",
                "reads path parameter 'customer', which '/usage' lacks",
                "add {customer} to the path",
            ),
            (
                '[[meters]]\nevent_name = "api"\n[[meters]]\nevent_name = "api"\n',
                "meters",
                "event_name 'api' appears in more than one [[meters]] table",
                "give each [[meters]] table its own event_name",
            ),
        ],
        ids=[
            "redis-scheme",
            "basil",
            "unknown-stage",
            "zero-shards",
            "prefix-braces",
            "route-source",
            "route-path-param",
            "duplicate-meters",
        ],
    )
    def test_bad_value_in_file(self, write_config, text, key, value, fix):
        """The message names the file, the key, the value and a fix."""
        path = write_config(text)
        message = config_error(path)
        assert str(path) in message
        assert f"{key} = " in message
        assert value in message
        assert "fix: " in message and fix in message

    def test_bad_value_in_environment(self, monkeypatch):
        """A bad variable names the key and value, and says it came from the environment."""
        monkeypatch.setenv("DUALWRITE_REDIS__SHARDS", "0")
        message = config_error()
        assert "in the environment" in message
        assert "redis.shards = '0'" in message and "DUALWRITE_REDIS__SHARDS" in message

    def test_every_error_is_listed(self, write_config):
        """Several bad values give one message with a line for each."""
        path = write_config('[redis]\nshards = 0\n[flags]\nsafe_stage = "beta"\n')
        message = config_error(path)
        assert "redis.shards = 0" in message and "flags.safe_stage = 'beta'" in message

    def test_redis_password_is_masked(self, monkeypatch):
        """A refused Redis URL is shown without its password."""
        monkeypatch.setenv("DUALWRITE_REDIS__URL", "http://:s3cret@cache:6379/0")
        message = config_error()
        assert "redis.url" in message and "s3cret" not in message
        assert "http://:****@cache:6379/0" in message

    def test_section_variable_that_is_not_json(self, monkeypatch):
        """DUALWRITE_REDIS holding a non-JSON value is a ConfigError saying how to set keys."""
        monkeypatch.setenv("DUALWRITE_REDIS", "redis://cache:6379/0")
        message = config_error()
        assert '"redis"' in message and "DUALWRITE_REDIS__URL" in message

    def test_section_that_is_not_a_table(self, write_config):
        """A section given as a plain value (stripe = 5) is a ConfigError, not a crash."""
        message = config_error(write_config("stripe = 5\n"))
        assert "stripe = 5" in message and "fix: " in message


class TestUnreadableFile:
    """A file that cannot be read or parsed is a ConfigError naming it."""

    def test_missing_file(self, tmp_path):
        """A missing file names the path and the way to fix it."""
        path = tmp_path / "nowhere.toml"
        message = config_error(path)
        assert repr(str(path)) in message and "cannot be read" in message
        assert "--config" in message and "DUALWRITE_CONFIG" in message

    def test_directory_instead_of_file(self, tmp_path):
        """A directory is not a config file."""
        message = config_error(tmp_path)
        assert repr(str(tmp_path)) in message and "cannot be read" in message

    def test_invalid_toml(self, write_config):
        """Broken TOML names the file and where parsing stopped."""
        path = write_config("[redis\nurl = 1\n")
        message = config_error(path)
        assert repr(str(path)) in message and "not valid TOML" in message and "line 1" in message
