"""``python -m dualwrite``: the same as the ``dualwrite`` command."""

from __future__ import annotations

from dualwrite.cli import main

main()
