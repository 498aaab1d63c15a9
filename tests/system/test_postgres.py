"""Scale-out storage: a real PostgreSQL server behind deploy/dagster_postgres.yaml.

A throwaway cluster (initdb into a temp folder, loopback only, a free port, password auth) is started;
$DAGSTER_HOME/dagster.yaml is the deploy template as shipped (it reads the connection from DAGSTER_PG_*);
`mosaic partitions` registers the config's partitions and `dagster asset materialize` runs one partition
with the jobs' default multiprocess executor. The run, its step worker and its materialization must be
in Postgres' tables, and Dagster must read them back from there.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.models import fast_config
from tests.support.runs import free_port

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "dagster_postgres.yaml"

pytestmark = pytest.mark.timeout(600)


def pg_bindir() -> Path | None:
    for name in ("pg_ctl", "initdb"):
        found = shutil.which(name)
        if found and Path(found).resolve().parent.joinpath("postgres").exists():
            return Path(found).resolve().parent
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all(Path(cand, b).exists() for b in ("initdb", "pg_ctl", "postgres")):
            return Path(cand)
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[dict[str, str]]:
    """A PostgreSQL cluster in a temp folder on 127.0.0.1; yields the DAGSTER_PG_* environment."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; run .ci/services.sh")
    pytest.importorskip("dagster_postgres", reason="pip install dagster-postgres")
    psycopg2 = pytest.importorskip("psycopg2", reason="pip install dagster-postgres (brings psycopg2-binary)")

    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="mosaic-pg-", dir="/tmp"))
    base.chmod(0o755)  # pytest's tmp_path is private to root; the server runs as 'postgres' when we are root
    if os.geteuid() == 0:
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        runuser = shutil.which("runuser")
        as_user = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]
        os.chown(base, pg.pw_uid, pg.pw_gid)

    def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
        full = as_user + ([shlex.join(cmd)] if as_user[:1] == ["su"] else cmd)
        return subprocess.run(full, check=True, capture_output=True, text=True, timeout=120, cwd=base, **kw)

    password = secrets.token_hex(16)
    pwfile = base / "pw"
    pwfile.write_text(password + "\n")
    if as_user:
        os.chown(pwfile, pg.pw_uid, pg.pw_gid)
    pwfile.chmod(0o600)
    port = free_port()
    data = base / "data"
    try:
        run([str(bindir / "initdb"), "-D", str(data), "-U", "mosaic", f"--pwfile={pwfile}", "-A", "scram-sha-256",
             "-E", "UTF8", "--no-sync", "--no-instructions"])
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} -c fsync=off"
        run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "-o", opts, "start"])
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="mosaic", password=password, dbname="postgres",
                                connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE dagster")
        conn.close()
        yield {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_DB": "dagster",
               "DAGSTER_PG_USERNAME": "mosaic", "DAGSTER_PG_PASSWORD": password}
    except subprocess.CalledProcessError as err:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        pytest.fail(f"PostgreSQL did not start: {err.cmd}\n{err.stdout}\n{err.stderr}\n{log[-2000:]}")
    finally:
        with contextlib.suppress(Exception):
            run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def test_materialization_recorded_in_postgres_with_the_multiprocess_executor(tmp_path: Path, tiny_model_dir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    config = fast_config(tmp_path, tiny_model_dir, layers=[0])
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(TEMPLATE, home / "dagster.yaml")  # used as shipped: no rendering, secrets from the environment

    with postgres_server() as pg_env:
        import psycopg2

        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
        env.update(pg_env, DAGSTER_HOME=str(home), MOSAIC_CONFIG=str(config), PYTHONPATH=str(ROOT),
                   TOKENIZERS_PARALLELISM="false")
        steps = [
            [sys.executable, "-m", "mosaic_dag.cli", "partitions", "--config", str(config)],
            [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "mosaic_dag.definitions", "-a", "defs",
             "--select", "dataset", "--partition", "toy.en"],
        ]
        for cmd in steps:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
            assert proc.returncode == 0, f"{' '.join(cmd[2:])}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

        conn = psycopg2.connect(host=pg_env["DAGSTER_PG_HOST"], port=int(pg_env["DAGSTER_PG_PORT"]),
                                user=pg_env["DAGSTER_PG_USERNAME"], password=pg_env["DAGSTER_PG_PASSWORD"],
                                dbname=pg_env["DAGSTER_PG_DB"], connect_timeout=10)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT run_id, status FROM runs")
                runs = cur.fetchall()
                assert len(runs) == 1 and runs[0][1] == "SUCCESS", runs
                run_id = runs[0][0]
                cur.execute("SELECT dagster_event_type, count(*) FROM event_logs WHERE run_id = %s "
                            "AND dagster_event_type IS NOT NULL GROUP BY dagster_event_type", (run_id,))
                events = dict(cur.fetchall())
                cur.execute("SELECT partitions_def_name, partition FROM dynamic_partitions ORDER BY 1")
                partitions = cur.fetchall()
        finally:
            conn.close()
        # (the event log keeps Dagster's historical name PIPELINE_SUCCESS for RUN_SUCCESS)
        assert events.get("ASSET_MATERIALIZATION") == 1 and events.get("PIPELINE_SUCCESS") == 1, events
        assert events.get("ASSET_CHECK_EVALUATION") == 3, events  # the dataset checks ran and were stored too
        assert events.get("STEP_WORKER_STARTED", 0) >= 1, f"no multiprocess step worker: {sorted(events)}"
        assert partitions == [("dataset", "toy.en"), ("target", "tiny.L0.s16")]

        # Dagster reads the same run back from Postgres
        from dagster import AssetKey, DagsterInstance

        for k, v in pg_env.items():
            monkeypatch.setenv(k, v)
        with DagsterInstance.from_config(str(home)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert [r.run_id for r in instance.get_runs()] == [run_id]
            mat = instance.get_latest_materialization_event(AssetKey("dataset"))
            assert mat is not None and mat.run_id == run_id
            assert mat.asset_materialization.partition == "toy.en"
        assert (tmp_path / "data" / "datasets" / "toy" / "en.parquet").exists()
