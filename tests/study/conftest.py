"""A real PostgreSQL server for the multi-worker study tests.

``postgres_server`` starts one per test session with the machine's own
``initdb``/``pg_ctl`` (``$PATH`` or ``/usr/lib/postgresql/*/bin``) on a free
local port, with trust authentication, no fsync, and its files in a fresh
temporary directory; ``postgres_url`` gives each test its own new database.

Where the binaries or the ``psycopg2`` driver are missing the tests are
skipped with the reason, except with ``FASTSGD_REQUIRE_POSTGRES=1`` (CI sets
it), where that is a failure. PostgreSQL refuses to run as root: as root, the
server runs as the unprivileged ``nobody`` user.
"""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid

import pytest


def _unavailable(reason: str):
    if os.environ.get("FASTSGD_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"FASTSGD_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


def _bindir():
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(found)
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2].split(".")[0]))
    dirs = [d for d in dirs if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl"))]
    return dirs[-1] if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """(host, port) of a PostgreSQL server running for the test session."""
    bindir = _bindir()
    if bindir is None:
        _unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin")
    try:
        import psycopg2  # noqa: F401  (SQLAlchemy's default PostgreSQL driver)
    except ImportError:
        _unavailable("the psycopg2 driver is not installed (pip install psycopg2-binary)")
    root = tempfile.mkdtemp(prefix="fastsgd-pg-")
    user = {}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        user = {"user": nobody.pw_uid, "group": nobody.pw_gid}
    os.chmod(root, 0o700)
    data, port = os.path.join(root, "data"), _free_port()

    def run(*args):
        proc = subprocess.run(args, capture_output=True, text=True, cwd=root, check=False, **user)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    run(os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    run(os.path.join(bindir, "pg_ctl"), "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
    try:
        yield "127.0.0.1", port
    finally:
        subprocess.run([os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                       capture_output=True, cwd=root, check=False, **user)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """The SQLAlchemy URL of a new, empty database on the session's server."""
    import psycopg2

    host, port = postgres_server
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(host=host, port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return f"postgresql+psycopg2://postgres@{host}:{port}/{name}"
