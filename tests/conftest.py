"""Test-wide settings. Under CI (the CI environment variable) hypothesis is derandomized,
so a CI run tries the same examples every time; locally each run explores new ones."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
