"""Shared test set-up: the tests folder on sys.path (for tiny_models), and a private state folder."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Daemons started by tests keep their deployments database under $XDG_STATE_HOME: never the user's own.
# Removed when pytest exits (every daemon a test starts is stopped by then), so runs leave no folders behind.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="nimbus-test-state-")
atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], ignore_errors=True)
os.environ.pop("STATE_DIRECTORY", None)
