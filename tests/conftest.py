import os
import sys

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# CI draws the same examples every run (reproducible landings); locally they vary.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
