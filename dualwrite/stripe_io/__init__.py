"""The two writers, on the official ``stripe`` SDK: legacy usage records and meter events.

This is the only package that imports ``stripe``. Stripe's exceptions (and the replies the proxy
forwards, ``failure_from_reply``) are turned into ``StripeFailure`` values here, once, classified
as retryable or permanent (``retryable``):

* retryable: network errors and timeouts, 409 (lock or idempotency conflicts), 429, 5xx, and anything
  carrying ``Stripe-Should-Retry: true``;
* permanent: everything else, and anything carrying ``Stripe-Should-Retry: false``.

stripe-python 12+ has no usage-record methods, so the legacy writer calls the endpoint through
``raw_request_async`` with a pinned pre-basil ``Stripe-Version``. dualwrite runs on stripe-python
11.x too: where the majors differ, ``_sdk`` alone asks (``v1_services`` for code outside this
package).

``StripeClock`` follows Stripe's clock from the ``Date`` of its replies: a usage timestamp of
``now`` is fixed to it, never to a host clock that may be ahead of Stripe's.

``StripeWriter.retrieve_item`` reads a subscription item for the proxy (its price and lookup key, and
its subscription's customer), with the proxy's caller's key. ``StripeReader`` makes the reads of
``dualwrite reconcile``: usage record summaries, meters, meter event summaries, a customer's items,
prices (once each) and invoice previews.
``AccountStripe`` makes the operator commands' calls (cutover, meters, backfill) at the pinned
version, page by page, their errors a ``StripeCallError`` carrying the ``StripeFailure``.
"""

from __future__ import annotations

from dualwrite.stripe_io._account import AccountStripe, StripeCallError
from dualwrite.stripe_io._clock import StripeClock
from dualwrite.stripe_io._events import (
    ERROR_REPORT_EVENT,
    EventFetchError,
    EventSignatureError,
    MeterErrorReport,
    MeterErrorSample,
    fetch_error_report,
)
from dualwrite.stripe_io._failures import failure_from_exception, failure_from_reply, retryable
from dualwrite.stripe_io._invoices import InvoicePreview, PreviewLine, preview_from, swap_params
from dualwrite.stripe_io._reads import (
    MeterInfo,
    ReadThrottle,
    StripeReader,
    StripeReadError,
    SubscriptionItemInfo,
    UsageSummary,
)
from dualwrite.stripe_io._sdk import v1_services
from dualwrite.stripe_io._stream import MAX_STREAM_BATCH, MeterStream
from dualwrite.stripe_io._writer import ItemDetails, StripeWriter

__all__ = [
    "ERROR_REPORT_EVENT",
    "MAX_STREAM_BATCH",
    "RETIRED_LEGACY_MARKER",
    "AccountStripe",
    "EventFetchError",
    "EventSignatureError",
    "InvoicePreview",
    "ItemDetails",
    "MeterErrorReport",
    "MeterErrorSample",
    "MeterInfo",
    "MeterStream",
    "PreviewLine",
    "ReadThrottle",
    "StripeCallError",
    "StripeClock",
    "StripeReadError",
    "StripeReader",
    "StripeWriter",
    "SubscriptionItemInfo",
    "UsageSummary",
    "failure_from_exception",
    "failure_from_reply",
    "fetch_error_report",
    "preview_from",
    "retryable",
    "swap_params",
    "v1_services",
]

#: Stripe's wording when a usage record is sent for an item already moved to a meter-backed price.
RETIRED_LEGACY_MARKER = "not on the legacy metered billing system"
