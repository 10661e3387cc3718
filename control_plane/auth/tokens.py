"""Bearer tokens: HS256 JWTs behind an ``ias_`` prefix so secret scanners can spot them.

The signing keys live in the database, so every replica verifies every token.
"""

from __future__ import annotations

import contextvars
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

import jwt

from control_plane.errors import Unauthenticated
from control_plane.ids import new_id

PREFIX: Final = "ias_"
ISSUER: Final = "ias-control-plane"
# Verified tokens kept so a busy client's calls skip the HMAC and JSON work (~4% of server CPU).
VERIFIED_CACHE_SIZE: Final = 1024


class Role(StrEnum):
    """What a credential may do in its workspace."""

    ADMIN = "admin"
    WORKER = "worker"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the verified content of a token."""

    subject: str
    workspace_id: str
    role: Role
    token_id: str


current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("current_principal")


class TokenAuthority:
    """Mints and verifies tokens with the keys it was given (key id → secret)."""

    def __init__(self, *, keys: Mapping[str, str], current_key_id: str) -> None:
        self._keys = dict(keys)
        self._current = current_key_id
        # token → (principal, expiry as a Unix time); least recently used first.
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def mint(self, *, workspace_id: str, role: Role, subject: str, now: datetime, ttl: timedelta) -> str:
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "ws": workspace_id,
            "role": role.value,
            "jti": new_id("tok"),
            "iat": int(now.timestamp()),
            "exp": int((now + ttl).timestamp()),
        }
        body = jwt.encode(
            claims, self._keys[self._current], algorithm="HS256", headers={"kid": self._current}
        )
        return PREFIX + body

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; a token verified before is trusted until it expires."""
        cached = self._verified.get(token)
        if cached is not None and time.time() < cached[1]:
            self._verified.move_to_end(token)
            return cached[0]
        principal, expires = self._verify(token)
        self._verified[token] = (principal, expires)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        if not token.startswith(PREFIX):
            raise Unauthenticated("not an IAS token (expected the ias_ prefix)")
        body = token[len(PREFIX) :]
        try:
            key_id = jwt.get_unverified_header(body).get("kid", "")
            secret = self._keys.get(key_id)
            if secret is None:
                raise Unauthenticated("token signed with an unknown key")
            claims = jwt.decode(
                body, secret, algorithms=["HS256"], issuer=ISSUER, options={"require": ["exp", "sub", "jti"]}
            )
            principal = Principal(
                subject=claims["sub"],
                workspace_id=claims["ws"],
                role=Role(claims["role"]),
                token_id=claims["jti"],
            )
            return principal, float(claims["exp"])
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired") from exc
        except (jwt.InvalidTokenError, KeyError, ValueError) as exc:
            raise Unauthenticated("invalid token") from exc
