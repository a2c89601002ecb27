from __future__ import annotations

from flask import Flask, request

from dualwrite import RecordOutcome
from dualwrite.wsgi import DualWriteMiddleware

app = Flask(__name__)


@app.post("/api/usage/<customer>")
def report_usage(customer: str) -> dict[str, object]:
    outcome: RecordOutcome = request.environ["dualwrite"]  # the writes are already made
    return {"recorded": outcome.accepted, "stripe_id": outcome.authoritative.stripe_id}


# Settings from DUALWRITE_CONFIG and the environment (Settings.load()).
app.wsgi_app = DualWriteMiddleware(app.wsgi_app)  # type: ignore[method-assign]
