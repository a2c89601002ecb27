"""The smallest Django settings that serve the example's usage view."""

from __future__ import annotations

SECRET_KEY = "dualwrite-example-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "examples.django_app.project.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
# Or, instead of wrapping the WSGI app (wsgi.py), dual-write inside Django's own chain:
# MIDDLEWARE = ["dualwrite.wsgi.DualWriteDjangoMiddleware", *MIDDLEWARE]
