"""Runnable examples of dualwrite in Python apps (README "Other Python apps"); the tests run them."""
