"""Bearer-key authentication for the HTTP API, as an aiohttp middleware, and loading keys from config and files.

Rules (deny by default):
- paths in `public_paths` (exact match: /health, /ready, maybe /metrics) need nothing;
- `/admin` and `/admin/...` always need an admin key; with no admin key configured the admin API is
  disabled (403 saying how to enable it);
- every other path, /v1/... and unknown ones alike, needs an API key or an admin key when API keys are
  configured (an unknown path without a key is 401, not 404: the route table is not revealed). With no API
  key configured they are open, like vLLM without --api-key: fine on 127.0.0.1, not on a public interface.

Authorisation and routing look at the same string: `request.rel_url.path_safe`, which aiohttp's
UrlDispatcher matches routes against. On top of that a request target that is not canonical once
percent-decoded ('.' or '..' segments, '//', a backslash) is answered 400 before any key is checked, so no
layer that normalises differently (a proxy, a future aiohttp) can route it somewhere it was not authorised;
and a path that reads as /admin/... once its encoded slashes are decoded is held to the admin rule. Route
matching is case-sensitive in aiohttp and here alike: /ADMIN/x is an unknown route (401, then 404).

Keys are compared as SHA-256 digests with `hmac.compare_digest` against every configured key, with no early
exit: neither the time taken nor the length of the answer says which key, or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from daemon.requests import APIError

log = logging.getLogger("nimbus.auth")

MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 512
ADMIN_PREFIX = "/admin"
BEARER_HELP = "send the header 'Authorization: Bearer <key>'"
ADMIN_DISABLED = ("the admin API is disabled: no admin key is configured (set server.admin_keys or "
                  "server.admin_key_files in the config to enable it)")


def check_key(key: str, where: str) -> str:
    """Returns `key` if it is usable as a bearer key; raises ValueError naming `where`, never the key."""
    if not isinstance(key, str):
        raise ValueError(f"the key {where} must be a string")
    if not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS:
        raise ValueError(f"the key {where} has {len(key)} characters: keys must have {MIN_KEY_CHARS} to "
                         f"{MAX_KEY_CHARS} (make one with: openssl rand -hex 32)")
    if not all("!" <= ch <= "~" for ch in key):
        raise ValueError(f"the key {where} may hold only visible ASCII characters (no spaces)")
    return key


def load_keys(values: Sequence[str], files: Sequence[str | os.PathLike[str]] = (),
              env_var: str | None = None) -> list[str]:
    """Keys given inline, then read from `files`, then from the environment variable `env_var` if set.

    A key file holds one key per line; blank lines and lines starting with '#' are skipped. A file that
    other users may read is accepted with a warning (mounted secrets are often 0444; prefer 0400/0600).
    Every key is checked with `check_key`; duplicates are dropped. Raises ValueError on anything wrong.
    """
    keys = [check_key(key, f"#{i + 1} in the config") for i, key in enumerate(values)]
    for name in files:
        keys.extend(_read_key_file(Path(name)))
    if env_var and (value := os.environ.get(env_var, "").strip()):
        keys.append(check_key(value, f"in ${env_var}"))
    return list(dict.fromkeys(keys))


def _read_key_file(path: Path) -> list[str]:
    try:
        text, mode = path.read_text(), path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the key file {path}: {exc}") from None
    if mode & 0o077:
        log.warning("key file %s is readable by other users (mode %o); chmod 600 it", path, mode & 0o777)
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(check_key(line, f"at {path}:{number}"))
    return keys


def _digests(keys: Sequence[str], what: str) -> list[bytes]:
    return [hashlib.sha256(check_key(k, f"#{i + 1} of the {what}").encode()).digest() for i, k in enumerate(keys)]


def _matches(presented: str, digests: Sequence[bytes]) -> bool:
    """True if `presented` is one of the keys; every digest is compared, whatever matched before."""
    digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
    found = False
    for known in digests:
        found |= hmac.compare_digest(digest, known)
    return found


def routed_path(request: web.BaseRequest) -> str:
    """The path aiohttp routes this request by, or APIError(400) if its target is not canonical."""
    raw = request.raw_path
    # origin-form (/path?query) is split by hand: urlsplit would read '//admin/x' as host 'admin'
    raw = raw.split("?", 1)[0].split("#", 1)[0] if raw.startswith("/") else urlsplit(raw).path
    decoded = unquote(raw)
    segments = decoded.split("/")
    inner = segments[1:-1]  # a trailing slash is an empty last segment: harmless, it just routes nowhere
    target = request.rel_url.path_safe
    if (not decoded.startswith("/") or "\\" in decoded or "" in inner or "." in segments or ".." in segments
            or unquote(target) != decoded):
        raise APIError("the request path is not canonical (no '.', '..', '//' or backslash, even "
                       "percent-encoded)", code="invalid_path")
    return target


def _unauthorized(message: str) -> web.Response:
    err = APIError(message, status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return web.json_response(err.body(), status=401, headers=err.headers)


def _forbidden(message: str, code: str) -> web.Response:
    err = APIError(message, status=403, code=code, type_="permission_error")
    return web.json_response(err.body(), status=403)


def _bearer_token(request: web.BaseRequest) -> str | web.Response:
    """The presented key, or the 401 to answer when there is none in a usable form."""
    values = request.headers.getall("Authorization", [])
    if not values:
        return _unauthorized(f"missing API key: {BEARER_HELP}")
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if len(values) > 1 or scheme.lower() != "bearer" or not token:
        return _unauthorized(f"unsupported Authorization header: {BEARER_HELP}")
    return token


def auth_middleware(api_keys: Sequence[str], admin_keys: Sequence[str],
                    public_paths: frozenset[str] = frozenset({"/health", "/ready"})) -> Middleware:
    """A middleware enforcing the rules in this module's docstring; raises ValueError on an unusable key.

    Put it first in `web.Application(middlewares=[...])` so nothing runs for a request before it is
    authorised. It answers its own errors (OpenAI's error shape), so its place relative to other
    middlewares does not change what clients see.
    """
    admin = _digests(admin_keys, "admin keys")
    api = _digests(api_keys, "API keys") + admin if api_keys else []
    if not api_keys:
        log.warning("no API key configured: every non-admin route is open to anyone who can reach the port")
    if not admin:
        log.info("no admin key configured: the admin API is disabled")

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = _refusal(request, api, admin, public_paths)
        return refusal if refusal is not None else await handler(request)

    return authenticate


def _refusal(request: web.BaseRequest, api: Sequence[bytes], admin: Sequence[bytes],
             public_paths: frozenset[str]) -> web.Response | None:
    """The answer refusing `request`, or None if it may go on to its handler."""
    try:
        path = routed_path(request)
    except APIError as exc:
        return web.json_response(exc.body(), status=exc.status)
    # an encoded slash ('/admin%2Fx') routes nowhere today, but a future '/{name:.*}' route would see
    # 'admin/x': such a path is held to the admin rule too
    is_admin = any(p == ADMIN_PREFIX or p.startswith(ADMIN_PREFIX + "/") for p in (path, unquote(path)))
    if path in public_paths or (not is_admin and not api):
        return None
    if is_admin and not admin:
        return _forbidden(ADMIN_DISABLED, "admin_api_disabled")
    token = _bearer_token(request)
    if isinstance(token, web.Response):
        return token
    if _matches(token, admin if is_admin else api):
        return None
    if is_admin and _matches(token, api):
        return _forbidden("this key may not use the admin API: use an admin key", "not_admin_key")
    return _unauthorized("invalid API key")
