"""dualwrite: move Stripe usage billing from legacy usage records to Billing Meters, safely."""

from __future__ import annotations
