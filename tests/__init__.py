"""dualwrite's tests; run them as the README says (``bash scripts/test``)."""

import os

# rich sizes a console from COLUMNS when the console is made: pytest-xdist's workers inherit
# COLUMNS=80, which would pin the CLI's consoles (made when dualwrite.cli is imported) to 80
# columns whatever width a test's runner asks for. This runs before any test module's imports.
os.environ.pop("COLUMNS", None)
