"""Record usage from a script with the direct API.

    DUALWRITE_CONFIG=examples/dualwrite.toml STRIPE_API_KEY=sk_... \
        python examples/record_usage.py cus_123 si_456 5 job-2024-06-01-cus_123
"""

from __future__ import annotations

import sys

from dualwrite import SyncRecorder

customer, item, quantity, identifier = sys.argv[1:5]
with SyncRecorder() as recorder:  # settings from DUALWRITE_CONFIG and the environment
    outcome = recorder.record(
        customer=customer,
        subscription_item=item,
        quantity=int(quantity),
        event_name="api_requests",
        identifier=identifier,  # the same identifier again records nothing twice
    )
print(outcome.stage.value, outcome.accepted, outcome.authoritative.stripe_id)
