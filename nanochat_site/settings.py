"""Django settings, all taken from environment variables with safe local defaults.

Two deployments share this file:
- embedded (nothing installed): SQLite under the data home and a Redis server that
  `manage.py up` starts itself on a unix socket under the data home;
- services: `DATABASE_URL` (PostgreSQL) and `REDIS_URL` point at real servers, so more web,
  Celery and engine processes on more machines can share them.
"""

import os
from pathlib import Path

import dj_database_url

from nanochat_site import env
from nanochat_site.redis_urls import celery_url, channels_url

BASE_DIR = Path(__file__).resolve().parent.parent

# Data home: datasets, tokenizers, checkpoints, run directories, the SQLite file, the embedded
# Redis. Created on first use so a fresh machine needs no setup step.
NANOCHAT_HOME = env.data_home()
NANOCHAT_HOME.mkdir(parents=True, exist_ok=True)

SECRET_KEY = env.secret_key(NANOCHAT_HOME)
DEBUG = env.flag("DEBUG", default=False)
ALLOWED_HOSTS = env.csv("ALLOWED_HOSTS", default="localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env.csv("CSRF_TRUSTED_ORIGINS", default="")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "nanochat_site",
    "runs",
    "alerts",
    "chat",
    "arena",
]

MIDDLEWARE = [
    # First, so it times the whole stack and sees the final status (nanochat_site/metrics.py).
    "nanochat_site.metrics.MetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "nanochat_site.urls"
ASGI_APPLICATION = "nanochat_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database ---------------------------------------------------------------------------------
SQLITE_PATH = NANOCHAT_HOME / "db.sqlite3"
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{SQLITE_PATH}",
        conn_max_age=0,
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the Celery workers write concurrently: WAL lets readers proceed during
    # a write, IMMEDIATE transactions take the write lock up front (no upgrade deadlocks), and
    # the timeout makes a writer wait for the lock instead of failing with "database is locked".
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: Celery broker and Channels layer ---------------------------------------------------
EMBEDDED_REDIS_DIR = NANOCHAT_HOME / "redis"
EMBEDDED_REDIS_SOCKET = EMBEDDED_REDIS_DIR / "redis.sock"
# When REDIS_URL is unset, `manage.py up` starts Redis on this socket and every process it
# starts finds it here; a process started by hand (a shell, a second worker) finds it too.
REDIS_URL = os.environ.get("REDIS_URL") or f"unix://{EMBEDDED_REDIS_SOCKET}"
REDIS_EMBEDDED = not os.environ.get("REDIS_URL")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # channels_redis waits with a 5 s blocking pop and redis-py >= 8 times socket reads
            # out after 5 s by default, so every idle receive would raise TimeoutError and kill
            # idle websocket consumers and engine workers (django/channels_redis#422).
            "hosts": [{"address": channels_url(REDIS_URL), "socket_timeout": 30}],
            "prefix": "nanochat",
            # A web process receives every reply it relays on one list; replies stream up to
            # 50 chunks/s each, so the default cap of 100 messages is a fraction of a second.
            "capacity": 1000,
        },
    }
}

CELERY_BROKER_URL = celery_url(REDIS_URL)
CELERY_RESULT_BACKEND = celery_url(REDIS_URL)
CELERY_RESULT_EXPIRES = 24 * 3600
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {"runs.tasks.*": {"queue": "training"}}
# Training tasks run for hours: take one message at a time and acknowledge it only when done,
# so a worker that dies mid-run leaves the message for another worker instead of losing it.
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Redis going away (restarted by `manage.py up`, a network blip) must not stop a worker or
# beat: they retry the broker and the result backend until it answers again.
CELERY_BROKER_CONNECTION_RETRY = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_RESULT_BACKEND_ALWAYS_RETRY = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# A training run can outlive Redis' default one-hour redelivery window; without a longer
# timeout the broker would hand the same run to a second worker while the first still trains.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 7 * 24 * 3600}

# --- runs: heartbeats, lost-worker detection, cancel -------------------------------------------
# A running run's task writes a heartbeat every RUNS_HEARTBEAT_SECONDS; `celery beat` runs the
# reconciler every RUNS_RECONCILE_SECONDS, which fails runs silent for RUNS_STALE_SECONDS.
RUNS_HEARTBEAT_SECONDS = float(os.environ.get("RUNS_HEARTBEAT_SECONDS", "2"))
RUNS_STALE_SECONDS = float(os.environ.get("RUNS_STALE_SECONDS", "30"))
RUNS_RECONCILE_SECONDS = float(os.environ.get("RUNS_RECONCILE_SECONDS", "10"))
RUNS_CANCEL_GRACE_SECONDS = float(os.environ.get("RUNS_CANCEL_GRACE_SECONDS", "5"))
# The dashboard's one-click quick start runs this pipeline preset (training/configs/pipeline/).
RUNS_QUICKSTART_PRESET = os.environ.get("RUNS_QUICKSTART_PRESET", "demo-cpu")
# Hosts (or host:port) that user-given download URLs may reach although they resolve to a
# private, loopback or link-local address (training/fetch_policy.py); passed to the programs.
FETCH_ALLOWED_HOSTS = env.csv("NANOCHAT_FETCH_ALLOWED_HOSTS", default="")
CELERY_BEAT_SCHEDULE = {
    "reconcile-runs": {
        "task": "runs.reconcile",
        "schedule": RUNS_RECONCILE_SECONDS,
        "options": {"queue": "default", "expires": RUNS_RECONCILE_SECONDS},
    },
    # Alerts whose queued message was lost (Redis down when it was sent, a killed worker).
    "resend-alerts": {
        "task": "alerts.resend_due",
        "schedule": 60.0,
        "options": {"queue": "default", "expires": 60.0},
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(NANOCHAT_HOME / "celerybeat-schedule")

# --- alerts: webhooks and e-mail when a run ends or a metric crosses a threshold (alerts/) ----
# Links in notifications point here (scheme://host[:port], no trailing slash).
SITE_URL = os.environ.get("SITE_URL", f"http://localhost:{os.environ.get('PORT', '8000')}")
SITE_URL = SITE_URL.rstrip("/")
# Webhooks go only to public addresses; hosts (or host:port) named here may be private,
# loopback or link-local ones (a chat server on the LAN). Checked on save and on every send.
ALERT_WEBHOOK_ALLOWED_HOSTS = env.csv("ALERT_WEBHOOK_ALLOWED_HOSTS", default="")
ALERT_WEBHOOK_TIMEOUT = float(os.environ.get("ALERT_WEBHOOK_TIMEOUT", "10"))  # seconds
# A failed delivery is tried again after base, 2*base, 4*base ... seconds, this often in all.
ALERT_MAX_ATTEMPTS = int(os.environ.get("ALERT_MAX_ATTEMPTS", "5"))
ALERT_RETRY_BASE_SECONDS = float(os.environ.get("ALERT_RETRY_BASE_SECONDS", "30"))

# --- e-mail (alerts); the console backend writes messages to the worker's log -----------------
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env.flag("EMAIL_USE_TLS", default=False)
EMAIL_USE_SSL = env.flag("EMAIL_USE_SSL", default=False)
EMAIL_TIMEOUT = float(os.environ.get("EMAIL_TIMEOUT", "10"))
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "nanochat@localhost")

# --- Prometheus /metrics (nanochat_site/metrics.py) ------------------------------------------
# With a token set a scraper must send `Authorization: Bearer <token>`; without one only these
# client addresses (or CIDR networks) may read it. REMOTE_ADDR is what counts: behind a proxy
# that is the proxy's address, so set a token there.
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")
METRICS_ALLOWED_IPS = env.csv("METRICS_ALLOWED_IPS", default="127.0.0.1,::1")

# --- auth, i18n, static -------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = NANOCHAT_HOME / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Serve static files straight from the finders: no collectstatic step before `make run`.
WHITENOISE_USE_FINDERS = True

# --- limits on what a client may send (nanochat_site/limits.py says why these values) ----------
API_MAX_BODY_BYTES = int(os.environ.get("API_MAX_BODY_BYTES", str(1024 * 1024)))  # JSON / frame
JSON_MAX_DEPTH = int(os.environ.get("JSON_MAX_DEPTH", "64"))  # nesting of arrays and objects
UPLOAD_MAX_BYTES = int(os.environ.get("UPLOAD_MAX_BYTES", str(1024**3)))  # one dataset's files
# Django's own caps agree: a form or request.body past API_MAX_BODY_BYTES is refused (uploaded
# files do not count), and files over 2.5 MiB are spooled to temporary files, not memory.
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES
FILE_UPLOAD_MAX_MEMORY_SIZE = int(2.5 * 1024 * 1024)

REST_FRAMEWORK = {
    "DEFAULT_PARSER_CLASSES": [
        "nanochat_site.limits.BoundedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "EXCEPTION_HANDLER": "runs.api.errors.api_exception_handler",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "nanochat site API",
    "DESCRIPTION": "Submit and monitor training runs, browse artifacts, chat with checkpoints.",
    "VERSION": "0.1.0",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Runs and artifacts both have a `status` with different choices; name them apart.
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "runs.models.Status",
        "ArtifactStatusEnum": "runs.models.ArtifactStatus",
    },
    # The OpenAI-compatible /v1 views are not DRF views: chat/openai_schema.py adds them.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "runs.api.responses.document_unreadable_bodies",
        "chat.openai_schema.add_openai_paths",
    ],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}

# --- chat ---------------------------------------------------------------------------------------
# SPEC §12 limits on what a client may send (see chat/limits.py for their meaning).
CHAT_LIMITS = {
    "max_messages": 500,
    "max_message_chars": 8000,
    "max_total_chars": 32000,
    "default_temperature": 0.8,
    "default_top_k": 50,
    "default_max_tokens": 512,
}
# Engine workers (`manage.py engine_worker`) take generation requests from this channel of the
# channel layer; every worker on the same Redis shares it, so load spreads between them.
CHAT_ENGINE_CHANNEL = os.environ.get("CHAT_ENGINE_CHANNEL", "engine")
CHAT_ENGINE_DEVICE = os.environ.get("CHAT_ENGINE_DEVICE", "auto")  # auto, cpu, cuda, cuda:1, mps
# Replies one worker decodes at once (the rows of each model's batch); a worker takes no new
# request while this many are in progress, leaving it to a less busy worker.
CHAT_ENGINE_MAX_ROWS = int(os.environ.get("CHAT_ENGINE_MAX_ROWS", "8"))
CHAT_ENGINE_MAX_MODELS = int(os.environ.get("CHAT_ENGINE_MAX_MODELS", "2"))  # LRU of checkpoints
# Text is sent to the browser at most this often per reply (seconds), in coalesced chunks.
CHAT_CHUNK_INTERVAL = float(os.environ.get("CHAT_CHUNK_INTERVAL", "0.02"))
CHAT_ENGINE_STATS_INTERVAL = 1.0  # seconds between a worker's stats/keepalive ticks
# A request nobody takes within this many seconds fails (channels_redis expires it at 60 s
# anyway); a taken request whose worker goes silent this long fails too.
CHAT_ENGINE_ACCEPT_TIMEOUT = float(os.environ.get("CHAT_ENGINE_ACCEPT_TIMEOUT", "60"))
CHAT_ENGINE_IDLE_TIMEOUT = float(os.environ.get("CHAT_ENGINE_IDLE_TIMEOUT", "30"))
# A worker's stats key expires this long after its last heartbeat (one per
# CHAT_ENGINE_STATS_INTERVAL); a reply whose worker's key is gone fails at once ("the engine
# worker serving this reply stopped"), checked every CHAT_ENGINE_ALIVE_CHECK seconds of silence.
CHAT_ENGINE_ALIVE_TTL = float(os.environ.get("CHAT_ENGINE_ALIVE_TTL", "3"))
CHAT_ENGINE_ALIVE_CHECK = float(os.environ.get("CHAT_ENGINE_ALIVE_CHECK", "0.5"))
