"""Where stripe-python's majors differ, for the calls dualwrite makes: the one place that asks.

dualwrite runs on stripe-python 11.x (apps still on legacy usage records keep their 11.x pin, whose
``create_usage_record`` methods 12 removed) and on every later major, the newest being the tested
default. Everything else it uses is common to all of them: ``StripeClient`` with
``base_addresses``, ``http_client`` and ``max_network_retries``, ``raw_request_async``, the v2 meter
event stream and session, the ``v2`` events service, the error classes and ``AIOHTTPClient``. The
differences:

* ``StripeObject.to_dict()`` is recursive from 15 on; before, it is shallow and deprecated
  (``plain``);
* the v1 services sit under ``client.v1`` from 13 on, on the client itself before (``v1_services``);
* a pushed thin event is parsed by ``parse_event_notification`` from 13 on, by ``parse_thin_event``
  before (``parse_event_notification``).

Where is which was read from each major's published wheel (``stripe/_stripe_client.py``,
``stripe/_stripe_object.py``). The oldest release dualwrite's tests pass on is 11.0.0, hence
``stripe>=11`` in ``pyproject.toml``.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import stripe

__all__ = [
    "STRIPE_MAJOR",
    "EventNotification",
    "parse_event_notification",
    "plain",
    "v1_services",
]

#: The installed stripe-python's major version.
STRIPE_MAJOR = int(stripe.VERSION.split(".")[0])


class EventNotification(Protocol):
    """A verified thin event: which event, of which type (fetch it whole to read more)."""

    @property
    def id(self) -> str: ...

    @property
    def type(self) -> str: ...


def plain(obj: stripe.StripeObject) -> dict[str, Any]:
    """A Stripe object as plain dicts and lists, nested objects included."""
    if STRIPE_MAJOR < 15:  # to_dict() is shallow (and deprecated) before 15
        return obj._to_dict_recursive()
    return obj.to_dict()


def v1_services(client: stripe.StripeClient) -> Any:
    """The client's v1 services (``client.v1`` from 13 on; the client itself before)."""
    return getattr(client, "v1", client)


def parse_event_notification(
    client: stripe.StripeClient, payload: bytes, signature: str | None, secret: str
) -> EventNotification:
    """Verify a pushed thin event's signature and read which event it is.

    Raises:
        stripe.SignatureVerificationError: the signature does not verify.
        ValueError: the payload is not an event.
    """
    parse = getattr(client, "parse_event_notification", None)
    if parse is None:  # before 13
        parse = client.parse_thin_event  # type: ignore[attr-defined]  # gone from the typed SDK
    return cast(EventNotification, parse(payload, signature, secret))
