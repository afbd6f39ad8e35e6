"""Registry authentication: credentials, WWW-Authenticate challenges and the bearer token flow.

A registry says how to authenticate in a 401's WWW-Authenticate header. Basic: send the
credentials. Bearer (docker's token spec): get a token from the challenge's realm for the
service and scopes ("repository:team/app:pull,push"), sending the credentials (if any) to the
token server with Basic auth, then retry with "Authorization: Bearer <token>". The Authorizer
remembers each host's challenge, so later requests authenticate up front, and caches tokens per
(realm, service, scopes) until shortly before they expire.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog

from runtimed.errors import InvalidArgument, PermissionDenied, Unavailable, q
from runtimed.remotes.http import read_error_body, registry_message, transport_error

log = structlog.get_logger("runtimed.remotes")

# docker's token spec: a token without expires_in is good for 60 seconds.
DEFAULT_TOKEN_LIFETIME = 60.0
# Refresh this long before expiry, so a token does not lapse between check and use.
TOKEN_EXPIRY_MARGIN = 10.0
# docker.io credentials live under docker's historical index URL in config.json.
_DOCKER_HUB_ALIASES = {"index.docker.io": "docker.io", "registry-1.docker.io": "docker.io"}


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never log a password
        return f"Credentials(username={self.username!r}, password=***)"

    def basic(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"


# Given a registry host as written in references ("docker.io", "127.0.0.1:5000"), its credentials.
CredentialProvider = Callable[[str], Credentials | None]


def normalise_host(key: str) -> str:
    """A config.json `auths` key ("https://index.docker.io/v1/", "http://h:5000") -> "docker.io", "h:5000"."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1]
    key = key.split("/", 1)[0]
    return _DOCKER_HUB_ALIASES.get(key, key)


def static_credentials(entries: Mapping[str, Credentials | tuple[str, str]]) -> CredentialProvider:
    """Credentials passed explicitly, keyed by registry host."""
    table = {
        normalise_host(host): value if isinstance(value, Credentials) else Credentials(*value)
        for host, value in entries.items()
    }
    return lambda host: table.get(normalise_host(host))


class DockerConfig:
    """Credentials from a docker-style config.json (`auths`: base64 `auth` or username/password).

    The file is $DOCKER_CONFIG/config.json or ~/.docker/config.json unless given; it is read
    when a registry first asks for credentials and re-read when it changes. Credential helpers
    (`credsStore`, `credHelpers`) are not run: the daemon executes no helper binaries.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is None:
            directory = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
            path = os.path.join(directory, "config.json")
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._table: dict[str, Credentials] = {}

    def __call__(self, host: str) -> Credentials | None:
        return self._load().get(normalise_host(host))

    def _load(self) -> dict[str, Credentials]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._table = None, {}
            return self._table
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._table = self._parse(self.path.read_bytes())
            self._stamp = stamp
        return self._table

    def _parse(self, raw: bytes) -> dict[str, Credentials]:
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise InvalidArgument(f"docker config {q(self.path)}: invalid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise InvalidArgument(f"docker config {q(self.path)}: not a JSON object")
        if document.get("credsStore") or document.get("credHelpers"):
            log.debug("docker config credential helpers ignored", path=str(self.path))
        table: dict[str, Credentials] = {}
        for key, entry in (document.get("auths") or {}).items():
            if not isinstance(entry, dict):
                continue
            username, password = entry.get("username") or "", entry.get("password") or ""
            if entry.get("auth"):
                try:
                    decoded = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
                except (binascii.Error, UnicodeDecodeError, ValueError):
                    raise InvalidArgument(
                        f"docker config {q(self.path)}: auths {q(key)}: `auth` is not base64 of user:password"
                    ) from None
                username, sep, password = decoded.partition(":")
                if not sep:
                    raise InvalidArgument(
                        f"docker config {q(self.path)}: auths {q(key)}: `auth` lacks the ':' of user:password"
                    )
            if username:
                table[normalise_host(key)] = Credentials(username, password)
        return table


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "bearer", "basic"
    params: dict[str, str]


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHALLENGE_PART = re.compile(
    rf"\s*,?\s*(?P<key>{_TOKEN})(?:\s*=\s*(?:(?P<token>{_TOKEN})|\"(?P<quoted>(?:[^\"\\]|\\.)*)\"))?"
)


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """Parse WWW-Authenticate values: `Bearer realm="...",service="...",scope="..."`, `Basic realm=...`."""
    challenges: list[Challenge] = []
    for header in headers:
        position = 0
        current: Challenge | None = None
        while position < len(header):
            match = _CHALLENGE_PART.match(header, position)
            if match is None or match.end() == position:
                break  # malformed rest: keep what was understood
            position = match.end()
            value = match["token"] if match["token"] is not None else match["quoted"]
            if value is None:  # a bare token starts a new challenge
                current = Challenge(match["key"].lower(), {})
                challenges.append(current)
            elif current is not None:
                current.params[match["key"].lower()] = re.sub(r"\\(.)", r"\1", value)
    return challenges


@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic()


class Authorizer:
    """Per-host authentication state, shared by all of a client's concurrent requests."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        credentials: CredentialProvider | None,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._http = http
        self._credentials = credentials
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str, tuple[str, ...]], _Token] = {}
        self._locks: dict[tuple[str, str, tuple[str, ...]], asyncio.Lock] = {}
        self.token_requests = 0  # for tests and debugging: how often a token server was asked

    def credentials_for(self, host: str) -> Credentials | None:
        return self._credentials(host) if self._credentials is not None else None

    async def authorization(self, host: str, scopes: Iterable[str]) -> str | None:
        """The Authorization header for a request to host needing scopes, from what host asked before."""
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self.credentials_for(host)
            return creds.basic() if creds is not None else None
        token = await self._token(host, challenge, _scope_key(scopes))
        return f"Bearer {token}"

    def unauthorized(
        self, host: str, headers: Iterable[str], scopes: Iterable[str], sent: str | None
    ) -> list[str] | None:
        """Learn from a 401. Returns the scopes to retry with, or None when a retry cannot help."""
        challenges = {c.scheme: c for c in parse_challenges(headers)}
        bearer, basic = challenges.get("bearer"), challenges.get("basic")
        if bearer is not None and bearer.params.get("realm"):
            merged = _scope_key([*scopes, *bearer.params.get("scope", "").split()])
            if sent is not None and sent.startswith("Bearer "):
                # Expired, revoked or short of scope: drop it; the retry asks for a fresh one.
                rejected = sent.removeprefix("Bearer ")
                for key in [k for k, token in self._tokens.items() if token.value == rejected]:
                    del self._tokens[key]
            self._challenges[host] = bearer
            return list(merged)
        if basic is not None:
            if self.credentials_for(host) is None or (sent is not None and sent.startswith("Basic ")):
                return None  # nothing to send, or what we sent was rejected
            self._challenges[host] = basic
            return list(scopes)
        return None

    async def _token(self, host: str, challenge: Challenge, scopes: tuple[str, ...]) -> str:
        realm, service = challenge.params["realm"], challenge.params.get("service", "")
        key = (realm, service, scopes)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # parallel requests for one scope share one token request
            cached = self._cached(realm, service, scopes)
            if cached is not None:
                return cached
            token = await self._fetch_token(host, realm, service, scopes)
            self._tokens[key] = token
            return token.value

    def _cached(self, realm: str, service: str, scopes: tuple[str, ...]) -> str | None:
        """A live token for these scopes, or for more (a pull,push token serves a pull)."""
        now = time.monotonic()
        exact = self._tokens.get((realm, service, scopes))
        if exact is not None and exact.expires > now:
            return exact.value
        for (other_realm, other_service, other_scopes), token in self._tokens.items():
            live = token.expires > now and (other_realm, other_service) == (realm, service)
            if live and _covers(other_scopes, scopes):
                return token.value
        return None

    async def _fetch_token(self, host: str, realm: str, service: str, scopes: tuple[str, ...]) -> _Token:
        params = [("scope", scope) for scope in scopes]
        if service:
            params.insert(0, ("service", service))
        headers = {"Accept": "application/json"}
        creds = self.credentials_for(host)
        if creds is not None:
            headers["Authorization"] = creds.basic()
        self.token_requests += 1
        started = time.monotonic()
        try:
            response = await self._http.get(realm, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise transport_error(
                exc, connect_timeout=self._connect_timeout, read_timeout=self._read_timeout
            ) from exc
        log.debug(
            "registry token request",
            host=host,
            realm=realm,
            scopes=" ".join(scopes),
            user=creds.username if creds else None,
            status=response.status_code,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        if response.status_code in (401, 403):
            body = await read_error_body(response)
            who = f"user {q(creds.username)}" if creds else "anonymous access"
            raise PermissionDenied(
                f"authentication failed for {host}: token server {realm} refused {who} "
                f"({response.status_code}): {registry_message(body)}"
            )
        if response.status_code != 200:
            body = await read_error_body(response)
            raise Unavailable(
                f"token server {realm} for {host} answered {response.status_code} "
                f"{response.reason_phrase}: {registry_message(body)}"
            )
        try:
            document = response.json()
            value = document.get("token") or document.get("access_token")
            lifetime = float(document.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            value = None
        if not value or not isinstance(value, str):
            raise Unavailable(f"token server {realm} for {host} answered without a token")
        margin = min(TOKEN_EXPIRY_MARGIN, lifetime / 5)
        return _Token(value, started + lifetime - margin)


def _parse_scopes(scopes: Iterable[str]) -> dict[str, set[str]]:
    """ "repository:a/b:pull,push" -> {"repository:a/b": {"pull", "push"}}, merging repeats."""
    merged: dict[str, set[str]] = {}
    for scope in scopes:
        resource, sep, actions = scope.rpartition(":")
        if not sep:  # not resource:actions: keep it whole
            resource, actions = scope, ""
        if resource:
            merged.setdefault(resource, set()).update(a for a in actions.split(",") if a)
    return merged


def _scope_key(scopes: Iterable[str]) -> tuple[str, ...]:
    """Scopes in one canonical form, so a challenge's "pull" and our "pull,push" ask for one token."""
    merged = _parse_scopes(scopes)
    return tuple(
        f"{resource}:{','.join(sorted(actions))}" if actions else resource
        for resource, actions in sorted(merged.items())
    )


def _covers(have: Iterable[str], need: Iterable[str]) -> bool:
    granted = _parse_scopes(have)
    return all(actions <= granted.get(resource, set()) for resource, actions in _parse_scopes(need).items())
