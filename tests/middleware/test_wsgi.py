"""The WSGI middleware in front of a small Flask app, and the Django middleware class, against the
stand-in (in-process WSGI calls; ``tests/middleware/test_examples.py`` runs them under gunicorn)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
from werkzeug.test import Client, create_environ, run_wsgi_app

from dualwrite.config import Settings
from dualwrite.models import RecordOutcome, Stage
from dualwrite.recorder import SyncRecorder
from dualwrite.wsgi import ENVIRON_KEY, DualWriteMiddleware
from tests.apps_support import make_scenario, put_at
from tests.conftest import SettingsFactory
from tests.support import EVENT_NAME, Scenario, cli_environment

USAGE_ROUTE = {
    "method": "POST",
    "path": "/usage/{customer}",
    "customer": "path:customer",
    "subscription_item": "json:item",
    "quantity": "json:quantity",
    "event_name": f"const:{EVENT_NAME}",
    "max_body_bytes": 4096,
}


def build_flask_app(calls: list[str]) -> flask.Flask:
    """A tiny Flask app: a usage endpoint reading request.environ["dualwrite"], plus others."""
    app = flask.Flask(__name__)

    @app.post("/usage/<customer>")
    def usage(customer: str) -> Any:
        outcome: RecordOutcome = flask.request.environ[ENVIRON_KEY]
        calls.append("usage")
        return {
            "stage": outcome.stage.value,
            "id": outcome.authoritative.stripe_id,
            "echo": flask.request.get_json(),
        }

    @app.get("/hello")
    def hello() -> str:
        calls.append("hello")
        return "hello"

    @app.get("/stream")
    def stream() -> flask.Response:
        return flask.Response((f"chunk {n}\n" for n in range(5)), mimetype="text/plain")

    @app.get("/usage/<customer>")
    def usage_page(customer: str) -> str:
        calls.append("page")
        return "a page, not usage"

    return app


@pytest.fixture
def settings(standin_settings: SettingsFactory) -> Settings:
    """Settings with one usage route."""
    return standin_settings(routes=(USAGE_ROUTE,))


@pytest.fixture
def scenario(standin_url: str, standin) -> Scenario:
    """A customer on a legacy metered price."""
    return make_scenario(standin_url)


@pytest.fixture
def recorder(settings: Settings) -> Iterator[SyncRecorder]:
    """The middleware's recorder, closed after the test."""
    with SyncRecorder(config=settings) as made:
        yield made


@pytest.fixture
def wrapped(recorder: SyncRecorder) -> tuple[Client, list[str], DualWriteMiddleware]:
    """A werkzeug client on the wrapped Flask app, the handlers called, and the middleware."""
    calls: list[str] = []
    app = build_flask_app(calls)
    middleware = DualWriteMiddleware(app.wsgi_app, recorder=recorder)
    app.wsgi_app = middleware  # type: ignore[method-assign]
    return Client(app), calls, middleware


def start_response_ignored(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None
) -> Any:
    """A WSGI start_response that keeps nothing."""
    return lambda data: None


def recorder_threads() -> int:
    """How many SyncRecorder loop threads are alive."""
    return sum(t.name == "dualwrite-recorder" for t in threading.enumerate())


class TestUsageRoutes:
    """Usage requests are recorded before the app runs, which finds the outcome in the environ."""

    def test_usage_is_recorded_and_app_sees_outcome_and_body(self, wrapped, scenario, standin):
        """The app gets environ["dualwrite"] and the JSON body as sent."""
        client, calls, _ = wrapped
        response = client.post(
            f"/usage/{scenario.customer}", json={"item": scenario.item, "quantity": 12}
        )
        assert response.status_code == 200, response.text
        data = response.get_json()
        assert data["stage"] == "legacy" and data["id"].startswith("mbur_")
        assert data["echo"] == {"item": scenario.item, "quantity": 12}
        assert calls == ["usage"]
        assert standin.legacy_total(scenario.item) == 12

    def test_idempotency_key_retry_writes_once(self, wrapped, scenario, standin):
        """Three posts with one Idempotency-Key: one usage record."""
        client, calls, _ = wrapped
        for _ in range(3):
            response = client.post(
                f"/usage/{scenario.customer}",
                json={"item": scenario.item, "quantity": 2},
                headers={"Idempotency-Key": "wsgi-same-key"},
            )
            assert response.status_code == 200
        assert standin.legacy_total(scenario.item) == 2
        assert calls == ["usage"] * 3

    def test_same_key_other_usage_is_idempotency_error(self, wrapped, scenario):
        """The same Idempotency-Key with another quantity: 400 idempotency_error."""
        client, _, _ = wrapped
        headers = {"Idempotency-Key": "wsgi-reused"}
        path = f"/usage/{scenario.customer}"
        client.post(path, json={"item": scenario.item, "quantity": 2}, headers=headers)
        response = client.post(path, json={"item": scenario.item, "quantity": 3}, headers=headers)
        assert response.status_code == 400
        assert response.get_json()["error"]["type"] == "idempotency_error"

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"quantity": 3}, None),  # no item: required at legacy
            ({"item": "si_x", "quantity": "three"}, "quantity"),
            ({"item": "si_x", "quantity": -1}, "quantity"),
        ],
    )
    def test_malformed_usage_is_400_and_writes_nothing(
        self, wrapped, scenario, standin, body, param
    ):
        """A bad field gets Stripe's error shape naming it; the app is not called."""
        client, calls, _ = wrapped
        if "item" in body:
            body = body | {"item": scenario.item}
        response = client.post(f"/usage/{scenario.customer}", json=body)
        assert response.status_code == 400, response.text
        error = response.get_json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == (param or "subscription_item")
        assert calls == []
        assert standin.legacy_total(scenario.item) == 0

    def test_not_json_is_400(self, wrapped, scenario):
        """A body that is not JSON names the field it was needed for."""
        client, _, _ = wrapped
        response = client.post(
            f"/usage/{scenario.customer}", data=b"{nope", content_type="application/json"
        )
        assert response.status_code == 400
        assert response.get_json()["error"]["param"] == "item"

    def test_body_over_the_route_limit_is_413(self, wrapped, scenario, standin):
        """A body larger than max_body_bytes is refused before it is read."""
        client, calls, _ = wrapped
        response = client.post(
            f"/usage/{scenario.customer}",
            json={"item": scenario.item, "quantity": 1, "pad": "x" * 5000},
        )
        assert response.status_code == 413
        assert response.get_json()["error"]["code"] == "request_too_large"
        assert calls == [] and standin.legacy_total(scenario.item) == 0

    def test_chunked_body_is_read(self, wrapped, scenario, standin):
        """A body without Content-Length (chunked, wsgi.input_terminated) is read to its end."""
        _, calls, middleware = wrapped
        body = json.dumps({"item": scenario.item, "quantity": 4}).encode()
        environ = create_environ(
            f"/usage/{scenario.customer}", method="POST", data=body, content_type="application/json"
        )
        del environ["CONTENT_LENGTH"]
        environ["wsgi.input_terminated"] = True
        chunks, status, _ = run_wsgi_app(middleware, environ)
        assert status == "200 OK", b"".join(chunks)
        assert calls == ["usage"] and standin.legacy_total(scenario.item) == 4

    def test_body_cut_short_records_nothing(self, wrapped, scenario, standin):
        """A client that goes away before the Content-Length it promised: a 400, and the part that
        arrived (here a whole JSON object) is not recorded as if it were the request."""
        _, calls, middleware = wrapped
        body = json.dumps({"item": scenario.item, "quantity": 1}).encode()
        environ = create_environ(
            f"/usage/{scenario.customer}", method="POST", data=body, content_type="application/json"
        )
        environ["CONTENT_LENGTH"] = str(len(body) + 5)  # five more bytes promised, never sent
        chunks, status, _ = run_wsgi_app(middleware, environ)
        reply = json.loads(b"".join(chunks))
        assert status.startswith("400"), reply
        assert f"ended after {len(body)} of its {len(body) + 5} bytes" in reply["error"]["message"]
        assert calls == [] and standin.legacy_total(scenario.item) == 0

    def test_stripe_refusal_returns_stripes_status_and_error(self, wrapped, scenario, standin):
        """Stripe refusing the usage record: its status and error, and the app is not called."""
        client, calls, _ = wrapped
        standin.faults.refuse(
            path=rf"/v1/subscription_items/{scenario.item}/usage_records",
            status=402,
            code="card_declined",
            message="refused by Stripe",
            count=1,
        )
        response = client.post(
            f"/usage/{scenario.customer}", json={"item": scenario.item, "quantity": 1}
        )
        assert response.status_code == 402
        assert response.get_json()["error"]["message"] == "refused by Stripe"
        assert response.headers["Stripe-Should-Retry"] == "false"
        assert calls == []

    def test_shadow_is_delivered_by_the_process_worker(self, wrapped, settings, scenario, standin):
        """At shadow, the recorder's in-process worker writes the meter event."""
        client, _, _ = wrapped
        put_at(settings, scenario.customer, Stage.SHADOW)
        response = client.post(
            f"/usage/{scenario.customer}", json={"item": scenario.item, "quantity": 3}
        )
        assert response.status_code == 200
        deadline = time.monotonic() + 15
        while standin.meter_total(scenario.customer, EVENT_NAME) < 3:
            assert time.monotonic() < deadline, "the shadow write was not delivered"
            time.sleep(0.02)
        assert standin.legacy_total(scenario.item) == 3


class TestHealth:
    """The three probe paths, answered as the ASGI middleware answers them (``dualwrite.health``)."""

    def probe(self, middleware: DualWriteMiddleware, path: str) -> tuple[int, dict[str, Any]]:
        chunks, status, _ = run_wsgi_app(middleware, create_environ(path))
        return int(status.split()[0]), json.loads(b"".join(chunks))

    def test_live_ready_and_health(self, wrapped):
        """Live answers 200; a probe starts the engine and its worker, as a usage request would;
        health shows Redis and the worker."""
        _, calls, middleware = wrapped
        assert self.probe(middleware, "/_dualwrite/live") == (200, {"status": "ok"})
        status, ready = self.probe(middleware, "/_dualwrite/ready")
        assert status == 200 and ready["status"] in ("ready", "degraded"), ready
        assert ready["role"] == "middleware" and ready["blocking"] == []
        status, health = self.probe(middleware, "/_dualwrite/health")
        assert status == 200 and health["redis"] == "ok" and health["worker"] == "running"
        assert health["stripe_key"] == "ok" and "redis_persistence" in health
        assert calls == []

    def test_closed_recorder_is_not_ready(self, settings):
        """After the recorder is closed (the process stopping): ready 503, live still 200."""
        recorder = SyncRecorder(config=settings)
        middleware = DualWriteMiddleware(build_flask_app([]).wsgi_app, recorder=recorder)
        assert self.probe(middleware, "/_dualwrite/ready")[0] == 200
        recorder.close()
        status, ready = self.probe(middleware, "/_dualwrite/ready")
        assert (status, ready["blocking"]) == (503, ["stopping"])
        assert self.probe(middleware, "/_dualwrite/live")[0] == 200

    def test_no_stripe_key_is_not_ready_and_warned(self, standin_settings, caplog):
        """Usage routes and no STRIPE_API_KEY: a warning at construction, readiness 503."""
        settings = standin_settings(routes=(USAGE_ROUTE,)).model_copy(
            update={"stripe_api_key": None}
        )
        with (
            caplog.at_level("WARNING", logger="dualwrite.wsgi"),
            SyncRecorder(config=settings) as recorder,
        ):
            middleware = DualWriteMiddleware(build_flask_app([]).wsgi_app, recorder=recorder)
            status, ready = self.probe(middleware, "/_dualwrite/ready")
        assert status == 503 and ready["blocking"] == ["stripe_key_missing"], ready
        assert "STRIPE_API_KEY is not set" in caplog.text

    def test_health_false_leaves_the_paths_to_the_app(self, recorder):
        """health=False: the app answers the probe paths (Flask's 404 here)."""
        middleware = DualWriteMiddleware(
            build_flask_app([]).wsgi_app, recorder=recorder, health=False
        )
        _, status, _ = run_wsgi_app(middleware, create_environ("/_dualwrite/ready"))
        assert status.startswith("404")


class TestPassThrough:
    """Every other request goes to the app untouched, without starting the engine."""

    def test_other_routes_pass_through(self, wrapped):
        """GET /hello reaches the app; no recorder thread is started for it."""
        client, calls, _ = wrapped
        response = client.get("/hello")
        assert response.text == "hello" and calls == ["hello"]
        assert recorder_threads() == 0

    def test_wrong_method_on_the_usage_path_passes_through(self, wrapped, scenario):
        """GET on the usage path is the app's own page."""
        client, calls, _ = wrapped
        response = client.get(f"/usage/{scenario.customer}")
        assert response.text == "a page, not usage" and calls == ["page"]

    def test_the_apps_iterable_is_returned_as_is(self, recorder):
        """A streaming response is the app's own iterable, not a buffered copy."""
        produced = iter([b"a", b"b"])

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return produced

        middleware = DualWriteMiddleware(app, recorder=recorder)
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/stream", "wsgi.input": None}
        assert middleware(environ, start_response_ignored) is produced

    def test_streaming_response_streams(self, wrapped):
        """Flask's streamed body arrives whole and in order."""
        client, _, _ = wrapped
        response = client.get("/stream")
        assert response.text == "".join(f"chunk {n}\n" for n in range(5))


class TestEvents:
    """Stripe's pushed error-report events reach the engine's receiver through the WSGI app."""

    def test_events_path_is_the_engines_receiver(self, standin_settings, monkeypatch):
        """With a signing secret, a badly signed event gets the receiver's 400."""
        monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_test")
        settings = standin_settings(routes=(USAGE_ROUTE,))
        assert settings.webhook_secret() == "whsec_test"
        with SyncRecorder(config=settings) as recorder:
            app = DualWriteMiddleware(lambda environ, start_response: [], recorder=recorder)
            response = Client(app).post(
                settings.webhooks.path, data=b"{}", headers={"Stripe-Signature": "t=1,v1=bad"}
            )
        assert response.status_code == 400
        assert response.get_json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------- Django

urlpatterns: list[Any] = []  # ROOT_URLCONF of the Django tests: filled in by the django fixture


@pytest.fixture
def django_client(
    tmp_path: Path, redis_url, key_prefix, standin_url, monkeypatch
) -> Iterator[tuple[Any, list[str]]]:
    """Django's test client on a project whose MIDDLEWARE starts with DualWriteDjangoMiddleware."""
    import django
    from django.conf import settings as django_settings
    from django.http import HttpResponse, JsonResponse
    from django.test import Client as DjangoClient
    from django.urls import clear_url_caches, path
    from django.views.decorators.csrf import csrf_exempt

    from dualwrite import wsgi

    calls: list[str] = []

    @csrf_exempt  # type: ignore[untyped-decorator]  # Django ships no type hints
    def usage(request: Any, customer: str) -> JsonResponse:
        calls.append("usage")
        outcome: RecordOutcome = request.dualwrite
        assert request.META[ENVIRON_KEY] is outcome
        return JsonResponse({"stage": outcome.stage.value, "echo": json.loads(request.body)})

    def hello(request: Any) -> HttpResponse:
        calls.append("hello")
        return HttpResponse("hello")

    for name, value in cli_environment(redis_url, key_prefix, standin_url).items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "dualwrite.toml"
    config.write_text(
        "[[routes]]\n"
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in USAGE_ROUTE.items())
        + f'\n[[meters]]\nevent_name = "{EVENT_NAME}"\n'
    )
    if not django_settings.configured:
        django_settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["testserver"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[
                "dualwrite.wsgi.DualWriteDjangoMiddleware",
                "django.middleware.common.CommonMiddleware",
                "django.middleware.csrf.CsrfViewMiddleware",
            ],
            INSTALLED_APPS=[],
            DATABASES={},
        )
        django.setup()
    monkeypatch.setattr(django_settings, "DUALWRITE_CONFIG", str(config), raising=False)
    monkeypatch.setattr(
        sys.modules[__name__],
        "urlpatterns",
        [path("usage/<str:customer>", usage), path("hello", hello)],
    )
    clear_url_caches()  # Django caches the resolver of ROOT_URLCONF, views and all
    yield DjangoClient(), calls
    recorder = wsgi._django_recorders.pop(str(config), None)
    if recorder is not None:
        recorder.close()


class TestDjangoMiddleware:
    """DualWriteDjangoMiddleware: the same behaviour inside Django's middleware chain."""

    def test_usage_is_recorded_and_view_sees_outcome(self, django_client, scenario, standin):
        """The view finds request.dualwrite and reads the body as sent."""
        client, calls = django_client
        response = client.post(
            f"/usage/{scenario.customer}",
            data=json.dumps({"item": scenario.item, "quantity": 8}),
            content_type="application/json",
        )
        assert response.status_code == 200, response.content
        assert response.json() == {
            "stage": "legacy",
            "echo": {"item": scenario.item, "quantity": 8},
        }
        assert calls == ["usage"] and standin.legacy_total(scenario.item) == 8

    def test_bad_input_is_400_naming_the_field(self, django_client, scenario, standin):
        """A quantity that is not a number: 400 with Stripe's shape; the view is not called."""
        client, calls = django_client
        response = client.post(
            f"/usage/{scenario.customer}",
            data=json.dumps({"item": scenario.item, "quantity": "many"}),
            content_type="application/json",
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "quantity"
        assert calls == [] and standin.legacy_total(scenario.item) == 0

    def test_body_over_the_limit_is_413(self, django_client, scenario):
        """The declared Content-Length is checked before Django reads the body."""
        client, calls = django_client
        response = client.post(
            f"/usage/{scenario.customer}",
            data=json.dumps({"item": scenario.item, "quantity": 1, "pad": "x" * 5000}),
            content_type="application/json",
        )
        assert response.status_code == 413 and calls == []

    def test_other_routes_pass_through(self, django_client):
        """/hello reaches its view untouched."""
        client, calls = django_client
        assert client.get("/hello").content == b"hello" and calls == ["hello"]
