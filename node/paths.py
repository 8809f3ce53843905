"""Names of the files a daemon keeps in its data dir (cheap to import for the CLI)."""

TOKEN_FILE = "api.token"
STATE_FILE = "daemon.json"
LOCK_FILE = "daemon.lock"
