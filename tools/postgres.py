"""A throwaway PostgreSQL server for the history's tests and benchmark: Debian's own binaries, a temporary folder,
a free loopback port, password authentication; stopped and removed by ``close``.

    server = Postgres.find()          # None when the package is not installed (apt-get install postgresql)
    server.start()
    url = server.url("postgres")      # postgresql://mrad:...@127.0.0.1:PORT/postgres
    server.stop(); server.start()     # a restart, on the same port
    server.close()

As root the server runs as the ``postgres`` user (PostgreSQL refuses to run as
root). Durability is off (``fsync=off``): a test server, not a store.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

PASSWORD = "Hist0ry-s3cret"  # tests check that it appears in no record, event, summary or log
USER = "mrad"
TOOL_TIMEOUT_S = 60  # initdb on two busy cores takes a few seconds; pg_ctl waits at most half this
WHY_NOT = "PostgreSQL is not installed (apt-get install postgresql; .ci/run does it as root)"


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/VERSION/bin), or None."""
    versions = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if versions:
        return max(versions, key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """One server in a folder of its own (see the module's docstring)."""

    def __init__(self, bin_dir: Path):
        self.bin = Path(bin_dir)
        self.folder = Path(tempfile.mkdtemp(prefix="mrad-postgres-"))
        self.data, self.port = self.folder / "data", _free_port()
        self._as: dict = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")  # KeyError: no such user, see find()
            self._as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        secret = self.folder / "password"
        secret.write_text(PASSWORD)
        if self._as:
            os.chown(secret, self._as["user"], self._as["group"])
        self._tool("initdb", "-D", str(self.data), "-U", USER, "--auth-local=trust", "--auth-host=scram-sha-256",
                   f"--pwfile={secret}", "-E", "UTF8", "--no-sync")
        secret.unlink()

    @classmethod
    def find(cls) -> "Postgres | None":
        """A new server's folder, made with initdb; None when PostgreSQL is not installed (or, as root, there is no
        postgres user to run it)."""
        found = binaries()
        if found is None:
            return None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return None
        return cls(found)

    def url(self, database: str = "postgres", password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self._tool("pg_ctl", "-D", str(self.data), "-w", "-t", str(TOOL_TIMEOUT_S // 2), "-l",
                   str(self.folder / "server.log"), "-o",
                   f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off", "start")

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected at once (what a restart of the database server does)."""
        self._tool("pg_ctl", "-D", str(self.data), "-w", "-t", str(TOOL_TIMEOUT_S // 2), "-m", "fast", "stop")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        """Stop the server (killed, if it does not stop) and remove its folder."""
        try:
            if self.running():
                self.stop()
        except (subprocess.SubprocessError, OSError):
            self._kill()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _kill(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass

    def _tool(self, name: str, *args: str) -> None:
        done = subprocess.run([str(self.bin / name), *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                              cwd=self.folder, **self._as)
        if done.returncode:
            raise subprocess.SubprocessError(f"{name} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
