"""The study's database: an Optuna storage opened by URL (SQLite in the study folder or a shared PostgreSQL or
MySQL server), with its driver picked, its failures said in one sentence, and two commands creating its tables
at once told apart from a database that does not answer.
"""

from __future__ import annotations

import importlib.util
import re
import time
import warnings

import optuna
from optuna.trial import FrozenTrial

from mamo.errors import MamoError, first_line

RETRY_OF = "retry_of"  # a trial's user attribute: the number of the interrupted trial it continues


def queue_retry(study: optuna.Study, number: int, params: dict) -> None:
    """Queue a retry of trial ``number`` with ``params``: it continues that trial's folder."""
    study.enqueue_trial(params, user_attrs={RETRY_OF: number})


def retry_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a retry (same parameters) of a trial Optuna failed because its worker's heartbeat stopped."""
    queue_retry(study, trial.number, trial.params)


ENGINE_ARGS: dict[str, dict] = {
    "sqlite": {"connect_args": {"timeout": 60}},  # several local workers wait for the file lock
    "postgresql": {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}},
    "mysql": {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}},
}


TABLE_RACE_ATTEMPTS = 3
# What the loser of two commands creating a study's tables at once is told: a table, or the schema version row
# Optuna's migration inserts (SQLite's and PostgreSQL's wordings).
TABLE_RACE_ERRORS = ("already exists", "UNIQUE constraint failed: alembic_version", "duplicate key value")


def _table_race(reason: str) -> bool:
    return any(text in reason for text in TABLE_RACE_ERRORS)


class StorageBusy(MamoError):
    """Another command was creating the study's tables at the same moment (it owns what it made)."""


DRIVERS: dict[str, tuple[str, ...]] = {"postgresql": ("psycopg", "psycopg2"), "mysql": ("MySQLdb", "pymysql")}


def shown_url(url: str) -> str:
    """A storage URL as messages show it: its password masked."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# Server errors (regular expressions) whose fix is in the --storage URL (PostgreSQL's and MySQL's wordings); a
# continue line shows the password as ***, which a pasted line must have put back.
STORAGE_ADVICE = (
    ("password authentication failed", "check the user and password in --storage (a printed command shows "
                                       "the password as ***: put it back)"),
    ("Access denied for user", "check the user and password in --storage"),
    ('database ".*" does not exist', "check the database name in --storage, or create it (e.g. createdb -O USER "
                                     "NAME)"),
    ("Unknown database", "check the database name in --storage, or create it"),
)

# SQLite's words for a file that is not (or no longer) a database.
DAMAGED_DATABASE = ("file is not a database", "database disk image is malformed")


def open_storage(url: str, create: bool = True, fix: str = "start the database or pass a reachable --storage URL",
                 ) -> optuna.storages.RDBStorage:
    """The study database; a URL that is malformed or does not answer is one sentence ending in ``fix``, not a
    traceback."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is no number, an unclosed [
        hidden = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)  # a password, even in a URL that does not parse
        raise MamoError(f"--storage '{hidden}' is not a database URL; write e.g. postgresql://user:password@host/db "
                        "or sqlite:///path/study.db.") from exc
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        # SQLite in memory: each connection (each worker) would see an empty database, and the study would end
        # with the command.
        raise MamoError(f"--storage '{url}' names no database file; write sqlite:///path/study.db, or leave "
                        "--storage out to keep the study in the study folder.")
    if parsed.drivername in DRIVERS:
        # SQLAlchemy 2.1 reads postgresql:// as psycopg 3; use whichever driver is installed.
        found = [d for d in DRIVERS[parsed.drivername] if importlib.util.find_spec(d) is not None]
        if found:
            url = parsed.set(drivername=f"{parsed.drivername}+{found[0]}").render_as_string(hide_password=False)
    try:
        return _rdb_storage(url, ENGINE_ARGS.get(parsed.get_backend_name(), {}), create)
    except ImportError as exc:
        missing = exc.name or parsed.drivername
        hint = (" (e.g. pip install psycopg2-binary, with no +driver in the URL)"
                if parsed.get_backend_name() == "postgresql" else "")
        raise MamoError(f"storage {shown} needs the database driver '{missing}', which is not installed; install "
                        f"it{hint}.") from exc
    except (SQLAlchemyError, ValueError, RuntimeError) as exc:
        reason = first_line(getattr(exc, "orig", None) or exc)
        if _table_race(reason):  # two commands created the study's tables at the same moment
            raise StorageBusy(f"storage {shown} was being set up by another command at the same moment ({reason}); "
                              "run this command again to join the study.") from exc
        if any(text in reason for text in DAMAGED_DATABASE):  # no permission or server would fix it
            raise MamoError(f"storage {shown} is a damaged database ({reason}); restore it from a copy, or start "
                            "the study in another folder (--run-dir) or database (--storage).") from exc
        for words, advice in STORAGE_ADVICE:  # a server that answered: the fix is in the URL, not the server
            if re.search(words, reason):
                fix = advice
        raise MamoError(f"storage {shown} could not be opened ({reason}); {fix}.") from exc


def _rdb_storage(url: str, engine_kwargs: dict, create: bool) -> optuna.storages.RDBStorage:
    from sqlalchemy.exc import SQLAlchemyError

    def connect() -> optuna.storages.RDBStorage:
        # A heartbeat lets a worker on another machine fail the trial of a worker that was killed, and retry it.
        # Optuna marks the argument experimental on every storage it opens: a warning users cannot act on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=60,
                                              grace_period=300, heartbeat_stale_trial_callback=retry_stale,
                                              skip_table_creation=not create)

    for _ in range(TABLE_RACE_ATTEMPTS - 1):
        try:
            return connect()
        except SQLAlchemyError as exc:
            # Two commands creating the tables at once: one fails; a retry finds them made.
            if not _table_race(str(exc)):
                raise
        time.sleep(0.5)
    return connect()


def storage_failure(exc: BaseException) -> str | None:
    """The first line of the database error behind ``exc`` (Optuna may raise its own error while handling it),
    or None when the storage is not what failed."""
    from sqlalchemy.exc import SQLAlchemyError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (SQLAlchemyError, optuna.exceptions.StorageInternalError)):
            return first_line(getattr(exc, "orig", None) or exc.__cause__ or exc)
        exc = exc.__cause__ or exc.__context__
    return None
