"""A minimal Django project behind dualwrite's WSGI middleware (README "Other Python apps")."""
