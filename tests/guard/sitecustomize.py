"""Apply the loopback guard in Python subprocesses started by the tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import loopback_guard

loopback_guard.install()
