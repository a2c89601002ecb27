"""Usage records created through the Stripe SDK, dual-written in-process.

    DUALWRITE_CONFIG=examples/dualwrite.toml STRIPE_API_KEY=sk_... \
        python examples/sdk_hook.py si_123=5 si_456=2
"""

from __future__ import annotations

import os
import sys

import stripe

from dualwrite import SyncRecorder
from dualwrite.stripe_hook import install

stripe.api_key = os.environ["STRIPE_API_KEY"]
stripe.api_base = os.environ.get("STRIPE_API_BASE", stripe.api_base)
client = stripe.StripeClient(stripe.api_key, base_addresses={"api": stripe.api_base})

recorder = SyncRecorder()  # settings from DUALWRITE_CONFIG and the environment
install(stripe, recorder)  # module-level calls
install(client, recorder)  # and this client


def report(item: str, quantity: int, *, through_client: bool) -> stripe.StripeObject:
    if hasattr(stripe.SubscriptionItem, "create_usage_record"):  # stripe-python 11.x
        if through_client:
            return client.subscription_items.usage_records.create(item, {"quantity": quantity})
        return stripe.SubscriptionItem.create_usage_record(item, quantity=quantity)
    response = client.raw_request(  # 12+ has no usage-record methods
        "post",
        f"/v1/subscription_items/{item}/usage_records",
        quantity=quantity,
        stripe_version="2025-02-24.acacia",
    )
    return client.deserialize(response, api_mode="V1")


for number, argument in enumerate(sys.argv[1:]):
    item, _, quantity = argument.partition("=")
    record = report(item, int(quantity), through_client=number % 2 == 1)
    print(record["id"], record["quantity"])
