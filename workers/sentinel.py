"""Redis high availability: a URL naming a Sentinel group serves run state, broker and result backend alike.

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB][?failover_timeout=SECONDS]

(`sentinel://` is the same URL.) HOST:PORT are the Sentinels (port 26379 by default), MASTER the name they
monitor, DB the database (0); USER and PASSWORD are the master's (and so its replicas'). The orchestrator's own
clients come from redis-py's `Sentinel.master_for`, which asks the Sentinels for the master on every new
connection; Celery's broker gets kombu's Sentinel transport and its result backend Celery's Sentinel backend,
both with `master_name` in their transport options.

A failover takes the Sentinels' `down-after-milliseconds` plus an election: meanwhile the old master refuses
connections and the Sentinels know no master. A client of ours waits that out, retrying for up to
`failover_timeout` seconds (30 by default), then raises; a group none of whose Sentinels answers fails at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from orchestrator.errors import ConfigError
from workers.outage import OutageRetry

SCHEMES = ("redis+sentinel", "sentinel")
TLS_SCHEMES = ("rediss+sentinel",)  # recognised, to be refused by name
DEFAULT_PORT = 26379
FAILOVER_TIMEOUT = 30.0
# Asking a Sentinel for the master is one small command: one that does not answer within this is skipped.
SENTINEL_TIMEOUT = 2.0
FORM = "redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]"


class SentinelURLError(ConfigError):
    """A Sentinel URL does not parse; the message shows it without its password."""


class SentinelsUnreachable(MasterNotFoundError):
    """No Sentinel of the group answered: not a failover to wait out, so clients fail at once."""


def is_sentinel(url: str | None) -> bool:
    """Whether url names a Sentinel group (and not a single Redis)."""
    return bool(url) and url.partition("://")[0].lower() in SCHEMES + TLS_SCHEMES  # type: ignore[union-attr]


@dataclass(frozen=True)
class SentinelURL:
    """A parsed Sentinel URL; `str()` shows it with the password masked."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    failover_timeout: float = FAILOVER_TIMEOUT

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        """The group url names; SentinelURLError, naming what is wrong, when it is malformed."""
        return _parse(url)

    def __str__(self) -> str:
        credentials = ""
        if self.username or self.password is not None:
            credentials = f"{quote(self.username or '', safe='')}{':***' if self.password is not None else ''}@"
        query = "" if self.failover_timeout == FAILOVER_TIMEOUT else f"?failover_timeout={self.failover_timeout:g}"
        return f"redis+sentinel://{credentials}{self.addresses}/{self.master}/{self.db}{query}"

    @property
    def addresses(self) -> str:
        """The Sentinels as `HOST:PORT,...`, for messages."""
        return ",".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.sentinels)

    def client(self, **options: Any) -> Redis:
        """A client of the group's current master: each new connection asks the Sentinels where it is, so a
        long-lived client (its pool, a pub/sub) follows a failover; a command waits one out."""
        group = GroupSentinel(self)
        credentials = {"username": self.username, "password": self.password}
        # The URL's failover_timeout bounds the wait, whatever retry a caller asks of a single Redis.
        options.pop("retry", None)
        retry = FailoverRetry(self.failover_timeout)
        client: Redis = group.master_for(  # type: ignore[no-untyped-call]
            self.master, redis_class=Redis, db=self.db, retry=retry, **credentials, **options
        )
        return client

    def celery_url(self) -> str:
        """The URL kombu's Sentinel transport and Celery's Sentinel backend read: one `sentinel://` URL per
        Sentinel, joined by `;`, each with the master's credentials and the database."""
        credentials = ""
        if self.username or self.password is not None:
            credentials = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(f"sentinel://{credentials}{address}/{self.db}" for address in self.addresses.split(","))

    def transport_options(self) -> dict[str, Any]:
        """kombu's and Celery's transport options naming the master (merged into the others)."""
        return {"master_name": self.master, "sentinel_kwargs": sentinel_options()}


def celery_url(url: str | None) -> str | None:
    """url as Celery takes it: kombu's form for a Sentinel URL, url itself otherwise."""
    return SentinelURL.parse(url).celery_url() if url and is_sentinel(url) else url


def transport_options(url: str | None) -> dict[str, Any]:
    """The transport options a Sentinel URL needs (its master's name), none for another URL."""
    return SentinelURL.parse(url).transport_options() if url and is_sentinel(url) else {}


class GroupSentinel(Sentinel):
    """redis-py's Sentinel, whose errors name the group: no Sentinel answering is `SentinelsUnreachable` (not
    retried), a master they do not know (yet) `MasterNotFoundError` (retried until the failover ends)."""

    def __init__(self, url: SentinelURL) -> None:
        super().__init__(list(url.sentinels), sentinel_kwargs=sentinel_options())  # type: ignore[no-untyped-call]
        self.url = url

    def discover_master(self, service_name: str) -> tuple[str, int]:
        unreachable = 0
        for position, sentinel in enumerate(self.sentinels):
            try:
                masters: dict[str, Any] = sentinel.sentinel_masters()  # type: ignore[assignment]
            except (RedisConnectionError, RedisTimeoutError):
                unreachable += 1
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):  # type: ignore[no-untyped-call]
                # The Sentinel that knew is asked first next time (as redis-py does).
                self.sentinels[0], self.sentinels[position] = sentinel, self.sentinels[0]
                return state["ip"], int(state["port"])
        if unreachable == len(self.sentinels):
            raise SentinelsUnreachable(f"no Sentinel of {self.url} answers")
        raise MasterNotFoundError(f"the Sentinels of {self.url} know no reachable master {service_name!r} "
                                  "(a failover in progress, or no replica to promote)")  # fmt: skip


def sentinel_options() -> dict[str, Any]:
    """redis-py's options for the connections to the Sentinels themselves: a Sentinel that does not answer
    at once is skipped for the next one (the client's own retry waits out a failover, not these)."""
    return {"socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT,
            "retry": Retry(NoBackoff(), 0)}  # fmt: skip


class FailoverRetry(OutageRetry):
    """A command waits out a failover (up to `timeout` seconds) and gives up at once when no Sentinel answers."""

    def __init__(self, timeout: float, cap: float = 0.5) -> None:
        super().__init__(timeout, cap)
        self.timeout = timeout
        self.cap = cap

    def gives_up(self, error: Exception) -> bool:
        return isinstance(error, SentinelsUnreachable)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, FailoverRetry) and (self.timeout, self.cap) == (other.timeout, other.cap)

    __hash__ = Retry.__hash__


def _parse(url: str) -> SentinelURL:
    scheme, separator, rest = url.partition("://")
    if scheme.lower() in TLS_SCHEMES:
        raise _error(url, "TLS to a Sentinel group is not supported yet")
    if not separator or scheme.lower() not in SCHEMES:
        raise _error(url, f"the scheme must be {' or '.join(s + '://' for s in SCHEMES)}")
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise _error(url, "a URL fragment ('#...') means nothing here")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username, password = _credentials(url, userinfo) if at else (None, None)
    if ";" in hosts:
        raise _error(url, "separate Sentinels with ',' (the ';' list is kombu's own form)")
    sentinels = tuple(_address(url, part) for part in hosts.split(","))
    master, db = _path(url, path)
    return SentinelURL(sentinels, master, db, username, password, _options(url, query))


def _credentials(url: str, userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _address(url: str, part: str) -> tuple[str, int]:
    if not part:
        raise _error(url, "a Sentinel HOST[:PORT] is missing (an empty entry in the list?)")
    if part.startswith("["):  # [IPv6]:PORT
        host, bracket, port = part[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise _error(url, f"the Sentinel address {part!r} is not [IPV6]:PORT")
        port = port[1:]
    else:
        host, _, port = part.partition(":")
    if not host:
        raise _error(url, f"the Sentinel address {part!r} has no host")
    if not port:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _error(url, f"the port of Sentinel {part!r} is not a number from 1 to 65535")
    return host, int(port)


def _path(url: str, path: str) -> tuple[str, int]:
    segments = path.split("/") if path else []
    if not segments or not segments[0]:
        raise _error(url, "the master's name is missing (the name the Sentinels monitor, after the hosts)")
    if len(segments) > 2:
        raise _error(url, f"the path has {len(segments)} parts where MASTER[/DB] is expected")
    master = unquote(segments[0])
    if master.isdigit():
        raise _error(url, f"{master!r} is a database number where the master's name is expected")
    if len(segments) == 1 or segments[1] == "":
        return master, 0
    if not segments[1].isdigit():
        raise _error(url, f"the database {segments[1]!r} is not a number")
    return master, int(segments[1])


def _options(url: str, query: str) -> float:
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"failover_timeout"})
    if unknown:
        raise _error(url, f"unknown option(s) {', '.join(unknown)} (known: failover_timeout)")
    if "failover_timeout" not in options:
        return FAILOVER_TIMEOUT
    try:
        timeout = float(options["failover_timeout"])
    except ValueError:
        timeout = -1.0
    if not 0 < timeout < 3600:
        raise _error(url, f"failover_timeout={options['failover_timeout']!r} is not a number of seconds (0 to 3600)")
    return timeout


def _error(url: str, problem: str) -> SentinelURLError:
    return SentinelURLError(f"invalid Sentinel URL {_masked(url)!r}: {problem}; expected {FORM}")


def _masked(url: str) -> str:
    """url with the password between '//' and the last '@' of its host part replaced by ***."""
    scheme, separator, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{separator}{userinfo.partition(':')[0]}:***@{hosts}{slash}{path}"
