from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

from dualwrite.wsgi import DualWriteMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.project.settings")
# Settings from DUALWRITE_CONFIG and the environment. Under gunicorn, each worker process starts
# its own outbox worker at its first usage request, after the fork.
application = DualWriteMiddleware(get_wsgi_application())
