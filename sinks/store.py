"""Where the events live: a DSN -> a clickhouse-connect client, embedded or server.

    chdb:///path/to/dir              embedded ClickHouse (chDB) in this process
    chdb://                          the default store, /var/lib/fdpass/store
    http(s)://user@host:port/db      a ClickHouse server (db: default fdpass)

One code path: both are clickhouse-connect clients, so the SQL, the inserts
and the errors are the same. The server password never comes from argv
(visible to every user in ps): FDPASS_CLICKHOUSE_PASSWORD or a file.

chDB runs one engine per store directory, and per process: a second process
opening the same directory fails on ClickHouse's status lock with an opaque
error. fdpass takes its own flock on <store>/fdpass.lock first and writes its
pid there, so the second opener gets "in use by pid N" instead.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fdpass import defaults
from fdpass.errors import UserError

DEFAULT_STORE = defaults.STORE_DIR
DEFAULT_DATABASE = "fdpass"
PASSWORD_ENV = "FDPASS_CLICKHOUSE_PASSWORD"


@dataclass(frozen=True)
class StoreSpec:
    kind: str  # "chdb" | "http"
    path: str | None = None  # chdb
    host: str | None = None  # http
    port: int | None = None
    username: str = "default"
    database: str = DEFAULT_DATABASE
    secure: bool = False

    def describe(self) -> str:
        if self.kind == "chdb":
            return f"chdb://{self.path}"
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.username}@{self.host}:{self.port}/{self.database}"


def parse_dsn(dsn: str | None) -> StoreSpec:
    dsn = (dsn or "chdb://").strip()
    parts = urlsplit(dsn)
    scheme = parts.scheme.lower()
    if scheme == "chdb":
        # chdb:///abs/path -> netloc "" and path "/abs/path"; chdb://rel is refused
        # (a relative store would move with the working directory).
        if parts.netloc:
            raise UserError(f"--clickhouse {dsn!r}: give an absolute path, e.g. chdb:///var/lib/fdpass/store")
        path = unquote(parts.path) or DEFAULT_STORE
        return StoreSpec(kind="chdb", path=os.path.abspath(path))
    if scheme in ("http", "https"):
        if parts.password is not None:
            raise UserError(
                "--clickhouse: do not put the password in the DSN (argv is visible to every user); "
                f"set {PASSWORD_ENV} or use --clickhouse-password-file"
            )
        if not parts.hostname:
            raise UserError(f"--clickhouse {dsn!r}: no host (expected {scheme}://user@host:port/db)")
        db = parts.path.strip("/") or DEFAULT_DATABASE
        if not db.replace("_", "").isalnum():
            raise UserError(f"--clickhouse {dsn!r}: database name {db!r} must be letters, digits and _")
        try:
            port = parts.port or (8443 if scheme == "https" else 8123)
        except ValueError:
            raise UserError(f"--clickhouse {dsn!r}: the port is not a number") from None
        return StoreSpec(
            kind="http", host=parts.hostname, port=port, username=unquote(parts.username or "default"),
            database=db, secure=scheme == "https",
        )
    raise UserError(f"--clickhouse {dsn!r}: expected chdb:///path or http(s)://user@host:port/db")


def read_password(password_file: str | None) -> str:
    if password_file:
        try:
            return Path(password_file).read_text().rstrip("\r\n")
        except OSError as e:
            raise UserError(f"--clickhouse-password-file {password_file}: {e.strerror}") from None
    return os.environ.get(PASSWORD_ENV, "")


# --- the embedded store's lock -------------------------------------------------
_lock = threading.Lock()
_held: dict[str, list] = {}  # path -> [fd, refcount]; clients of one process share the lock


def _holder_pid(path: str) -> str:
    for name in ("fdpass.lock", "status"):  # ours, then ClickHouse's own status file
        try:
            for line in Path(path, name).read_text().splitlines():
                if line.startswith("PID:"):
                    return line.split(":", 1)[1].strip()
                if line.strip().isdigit():
                    return line.strip()
        except OSError:
            pass
    return "?"


def _acquire(path: str) -> None:
    with _lock:
        if path in _held:
            _held[path][1] += 1
            return
        if _held:
            other = next(iter(_held))
            raise UserError(f"this process already has the store {other} open; chDB opens one store per process")
        try:
            os.makedirs(path, exist_ok=True)
            fd = os.open(os.path.join(path, "fdpass.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise UserError(f"cannot create the store {path}: permission denied (run as root or pass --clickhouse chdb:///a/dir/you/own)") from None
        except OSError as e:
            raise UserError(f"cannot create the store {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"store {path} is in use by another fdpass process (pid {_holder_pid(path)}): "
                            "chDB opens a store from one process at a time; stop that process, "
                            "or point --clickhouse at another store") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"PID: {os.getpid()}\n".encode())
        _held[path] = [fd, 1]


def _release(path: str) -> None:
    with _lock:
        entry = _held.get(path)
        if not entry:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[path]
            os.close(entry[0])  # closing drops the flock


def require_chdb() -> None:
    """The embedded store needs chDB, an optional part of fdpass: say how to get it."""
    try:
        import chdb  # noqa: F401  (clickhouse-connect imports it for chdb:// anyway)
    except ImportError:
        raise UserError("the embedded store (chdb://) needs chDB, which this install of fdpass leaves out: "
                        "pip install 'fdpass[embedded]' (scripts/setup installs it), or point --clickhouse at a "
                        "ClickHouse server (http://user@host:8123/fdpass)") from None


# --- the embedded store's allocator --------------------------------------------
# chDB's ClickHouse allocates with its own jemalloc, which reads its options
# from $JE_MALLOC_CONF once, when the library loads. Its built-in ones (an
# arena per CPU, freed pages kept 5 s) let a process that inserts ~150k rows/s
# grow by 210-240 MB, most of it pages its merges freed; one arena and 100 ms:
# 140-160 MB, for ~0.5 us more CPU per row (docs/architecture.md, "Memory").
MALLOC_CONF_ENV = "JE_MALLOC_CONF"
LEAN_MALLOC_CONF = "percpu_arena:disabled,narenas:1,dirty_decay_ms:100"


def lean_embedded_allocator() -> str | None:
    """Give chDB's allocator LEAN_MALLOC_CONF, unless $JE_MALLOC_CONF says otherwise: call it before the
    embedded store opens. The options in effect, or None when chDB is already loaded (too late)."""
    if "chdb" in sys.modules:
        return None
    if not os.environ.get(MALLOC_CONF_ENV):
        os.environ[MALLOC_CONF_ENV] = LEAN_MALLOC_CONF
    return os.environ[MALLOC_CONF_ENV]


def allocator_options(client) -> dict[str, str]:
    """The options chDB's jemalloc runs with (opt.NAME -> value), read back from the engine."""
    text = client.command("SELECT * FROM system.jemalloc_stats")
    found = re.findall(r"^\s*opt\.(narenas|percpu_arena|dirty_decay_ms|muzzy_decay_ms): (\S+)",
                       str(text).replace("\\n", "\n"), re.M)
    return {k: v.strip('"') for k, v in found}


class Store:
    """An opened store; `client()` hands out clickhouse-connect clients (one per thread)."""

    def __init__(self, spec: StoreSpec, password_file: str | None = None):
        self.spec = spec
        self._password = read_password(password_file) if spec.kind == "http" else ""
        self._clients: list = []
        if spec.kind == "chdb":
            require_chdb()
            _acquire(spec.path)
            self._locked = True
        else:
            self._locked = False

    @property
    def database(self) -> str:
        return self.spec.database

    def client(self, **settings):
        """A new client. Threads must not share one (an HTTP session serialises queries)."""
        import clickhouse_connect
        from clickhouse_connect.driver.exceptions import ClickHouseError

        spec = self.spec
        try:
            if spec.kind == "chdb":
                c = clickhouse_connect.get_client(dsn=f"chdb://{spec.path}", settings=settings or None)
            else:
                c = clickhouse_connect.get_client(
                    host=spec.host, port=spec.port, username=spec.username, password=self._password,
                    secure=spec.secure, settings=settings or None,
                    # no session: two clients of this process may query at once
                    autogenerate_session_id=False, connect_timeout=10, send_receive_timeout=300,
                )
        except ClickHouseError as e:
            raise StoreUnavailable(self._explain(e)) from e
        self._clients.append(c)
        return c

    def _explain(self, e: Exception) -> str:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if self.spec.kind == "chdb" and ("lock" in msg.lower() or "EmbeddedServer" in msg):
            return (f"store {self.spec.path} is in use by another process (pid {_holder_pid(self.spec.path)}): "
                    f"chDB opens a store from one process at a time ({msg})")
        return f"cannot connect to ClickHouse at {self.spec.describe()}: {msg}"

    def close(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:  # closing is best effort; the process may be exiting
                pass
        self._clients.clear()
        if self._locked:
            _release(self.spec.path)
            self._locked = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StoreUnavailable(UserError):
    """The store cannot be opened or reached now (a server may come back; a lock may be released)."""


def open_store(dsn: str | None, password_file: str | None = None) -> Store:
    return Store(parse_dsn(dsn), password_file)


def add_store_args(p) -> None:
    """--clickhouse DSN and its password file, for every command that opens the store."""
    p.add_argument("--clickhouse", metavar="DSN", default=defaults.STORE_DSN,
                   help="chdb:///path (embedded, default %(default)s) or http(s)://user@host:port/db; "
                        "the server password comes from $FDPASS_CLICKHOUSE_PASSWORD or --clickhouse-password-file")
    p.add_argument("--clickhouse-password-file", metavar="FILE", help="file holding the ClickHouse password")
