// The official stripe-node SDK, pointed at the dualwrite proxy (run by tests/proxy/test_proxy_node.py).
//
// stripe-node 18+ has no createUsageRecord (Stripe removed usage records in 2025-03-31.basil), so
// an app that still reports legacy usage calls the endpoint through rawRequest with a pre-basil
// apiVersion, exactly as below. The only dualwrite-specific setting is host/port/protocol.
'use strict';

const Stripe = require('stripe');

async function main() {
  const env = process.env;
  const stripe = new Stripe(env.STRIPE_KEY, {
    host: env.PROXY_HOST,
    port: Number(env.PROXY_PORT),
    protocol: 'http',
    maxNetworkRetries: 2,
  });
  const path = `/v1/subscription_items/${env.ITEM}/usage_records`;
  const params = {quantity: 11, timestamp: 'now', action: 'increment'};
  const options = {apiVersion: env.LEGACY_VERSION, idempotencyKey: env.IDEMPOTENCY_KEY};
  const record = await stripe.rawRequest('POST', path, params, options);
  const retried = await stripe.rawRequest('POST', path, params, options);
  const customer = await stripe.customers.retrieve(env.CUSTOMER);
  const headers = record.lastResponse ? record.lastResponse.headers : {};
  process.stdout.write(
    JSON.stringify({
      record,
      retried,
      requestId: headers['request-id'] || null,
      customer: {id: customer.id, object: customer.object},
    }),
  );
}

main().catch((error) => {
  process.stderr.write(`stripe-node failed: ${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
