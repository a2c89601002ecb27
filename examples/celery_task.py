"""Record usage from Celery tasks: ``celery -A examples.celery_task worker``."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_shutdown

from dualwrite import SyncRecorder

app = Celery("usage", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.result_backend = app.conf.broker_url
# Celery's keys under a prefix of their own, beside dualwrite's in the same Redis.
prefix = {"global_keyprefix": os.environ.get("CELERY_KEY_PREFIX", "celery:")}
app.conf.broker_transport_options = app.conf.result_backend_transport_options = prefix

recorder = SyncRecorder()  # one per process: each pool process starts its own at first use


@app.task(bind=True, name="report_usage", max_retries=5)
def report_usage(self, customer: str, subscription_item: str, quantity: int) -> bool:
    outcome = recorder.record(
        customer=customer,
        subscription_item=subscription_item,
        quantity=quantity,
        event_name="api_requests",
        identifier=self.request.id,  # a retried or redelivered task records once
    )
    failure = outcome.authoritative.failure
    if failure is not None and failure.retryable:
        raise self.retry(countdown=1)
    return outcome.accepted


@worker_process_shutdown.connect
def close_recorder(**_: object) -> None:
    recorder.close()  # the outbox worker finishes its batch; the rest stays pending for another
