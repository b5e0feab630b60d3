"""Settings of the boshmux attach example. Everything site-specific comes from the environment."""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

# Where boshmux is: its handoff API (server to server, with the api key) and the BOSH endpoint
# pages use (reached by the browser, cross-origin: list this site in boshmux's allowed_origins).
BOSHMUX_URL = os.environ.get("BOSHMUX_URL", "http://127.0.0.1:5380")
BOSHMUX_API_KEY = os.environ.get("BOSHMUX_API_KEY", "")
XMPP_DOMAIN = os.environ.get("XMPP_DOMAIN", "localhost")

INSTALLED_APPS = ["django.contrib.sessions", "attach"]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "attach.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "OPTIONS": {"context_processors": ["django.template.context_processors.csrf"]},
    }
]
# Signed cookies: the example needs no database.
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
DATABASES = {}
USE_TZ = True
