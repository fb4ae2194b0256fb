"""`GPUGATE_REDIS_URL` when it names Sentinels rather than one Redis.

    redis+sentinel://[[USER]:PASSWORD@]HOST1[:PORT1],HOST2[:PORT2]/MASTER_NAME[/DB]

The password (and user, if any) is the Redis master's, and is sent to the Sentinels too;
a Sentinel that has no password configured is then talked to without one (a common
setup), so one URL fits both deployments. A port left out is Sentinel's 26379. Every
other URL (`redis://`, `rediss://`, `unix://`) is redis-py's business, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.lower().startswith(SCHEME + "://")


def parse_sentinel(url: str) -> SentinelURL | None:
    """The Sentinels, master name and database of a `redis+sentinel://` URL; None for any
    other URL. A malformed Sentinel URL raises `ValueError` naming what is wrong."""
    if not is_sentinel(url):
        return None
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError("a redis+sentinel:// URL takes no query string or fragment")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    sentinels = tuple(_host_port(item) for item in hostlist.split(","))
    path = [unquote(segment) for segment in parts.path.split("/")[1:]]
    if not path or not path[0]:
        raise ValueError("a redis+sentinel:// URL names the master: .../MASTER_NAME[/DB]")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("after the master name a redis+sentinel:// URL takes only /DB, a number")
    db = int(path[1]) if len(path) == 2 else 0
    return SentinelURL(sentinels, path[0], db, username, password)


def no_password_set(message: str) -> bool:
    """Whether `message` is Redis's answer to AUTH when it has no password (6.0+, older):
    the Sentinel takes no password, and is asked without one."""
    return "without any password configured" in message or "no password is set" in message


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [::1]:26379
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ValueError(f"a Sentinel address without a host: {item!r}")
    if not port:
        return unquote(host), DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a Sentinel address with a bad port: {item!r}")
    return unquote(host), int(port)
