"""The same from async code, with ``Recorder``.

    DUALWRITE_CONFIG=examples/dualwrite.toml STRIPE_API_KEY=sk_... \
        python examples/record_usage_async.py cus_123 si_456 5 job-2024-06-01-cus_123
"""

from __future__ import annotations

import asyncio
import sys

from dualwrite import Recorder


async def main(customer: str, item: str, quantity: str, identifier: str) -> None:
    async with Recorder() as recorder:  # starts the engine and its outbox worker; closes them
        outcome = await recorder.record(
            customer=customer,
            subscription_item=item,
            quantity=int(quantity),
            event_name="api_requests",
            identifier=identifier,
        )
    print(outcome.stage.value, outcome.accepted, outcome.authoritative.stripe_id)


asyncio.run(main(*sys.argv[1:5]))
