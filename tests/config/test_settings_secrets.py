"""The secrets in ``Settings``: one getter scheme (``<field>_value()``), an empty variable unset."""

from __future__ import annotations

import pytest

from dualwrite.config import Settings

pytestmark = pytest.mark.usefixtures("clean_environment")

VARIABLES = {
    "STRIPE_API_KEY": "stripe_api_key_value",
    "STRIPE_WEBHOOK_SECRET": "stripe_webhook_secret_value",
    "DUALWRITE_REPORT_TOKEN": "report_token_value",
    "DUALWRITE_ADMIN_TOKEN": "admin_token_value",
    "DUALWRITE_METRICS_TOKEN": "metrics_token_value",
}


class TestGetters:
    """Each secret is read the same way."""

    @pytest.mark.parametrize(("variable", "getter"), VARIABLES.items())
    def test_set_empty_and_unset(self, monkeypatch, variable, getter):
        """Set: its value; set to nothing or unset: None (never an empty string)."""
        monkeypatch.setenv(variable, "s3cret-value-of-some-length")
        assert getattr(Settings.load(), getter)() == "s3cret-value-of-some-length"
        monkeypatch.setenv(variable, "")
        assert getattr(Settings.load(), getter)() is None
        monkeypatch.delenv(variable)
        assert getattr(Settings.load(), getter)() is None

    def test_former_names_agree(self, monkeypatch):
        """``api_key()`` and ``webhook_secret()`` still answer, as the new getters do."""
        monkeypatch.setenv("STRIPE_API_KEY", "")
        monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_x")
        settings = Settings.load()
        assert settings.api_key() is None and settings.webhook_secret() == "whsec_x"
