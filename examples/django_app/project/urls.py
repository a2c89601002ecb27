"""The example's one route."""

from __future__ import annotations

from django.urls import path

from examples.django_app.project.views import report_usage

urlpatterns = [path("api/usage/<str:customer>", report_usage)]
