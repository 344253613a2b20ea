"""Test settings: the real settings, with a throw-away data home.

The data home is chosen before the real settings are read so that no test ever touches the
user's datasets, checkpoints or database file. DATABASE_URL and REDIS_URL are honoured, which
is how CI runs the same suite against PostgreSQL and a system Redis.
"""

import atexit
import os
import shutil
import tempfile

_home = tempfile.mkdtemp(prefix="nanochat-test-")
os.environ["NANOCHAT_HOME"] = _home
atexit.register(shutil.rmtree, _home, ignore_errors=True)
# No test logs to the developer's Weights & Biases: a WANDB_PROJECT in their shell would make
# every training test a W&B run (tests/training/test_wandb.py sets its own, offline).
for _name in [n for n in os.environ if n.startswith("WANDB_")]:
    del os.environ[_name]
os.environ["WANDB_MODE"] = "offline"

from nanochat_site.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests
# No download host is allowed past the public-only policy unless a test says so itself.
FETCH_ALLOWED_HOSTS: list[str] = []

if DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3":  # noqa: F405
    # One test database per session, so two suites on one PostgreSQL server do not collide.
    DATABASES["default"]["TEST"] = {"NAME": f"test_nanochat_{os.getpid()}"}  # noqa: F405
else:
    # A file, not SQLite's in-memory default: tests that start real Celery workers need those
    # processes to open the same test database.
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(_home, "test-db.sqlite3")}  # noqa: F405
