from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from dualwrite import RecordOutcome


def report_usage(request: HttpRequest, customer: str) -> JsonResponse:
    outcome: RecordOutcome = request.environ["dualwrite"]  # the writes are already made
    return JsonResponse(
        {"recorded": outcome.accepted, "stripe_id": outcome.authoritative.stripe_id}
    )
