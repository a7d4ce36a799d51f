"""Passwords: the strength rules and argon2id hashing (off the event loop).

The contract already bounds the length (protovalidate: 12 to 128 characters); the rules here repeat
that (the service may be called without the interceptor) and add what a schema cannot say: not a
common password, not built from the email's local part.
"""

from __future__ import annotations

import asyncio
import secrets

from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from services.identity.errors import weak_password

MIN_LENGTH = 12
MAX_LENGTH = 128
# The shortest local part that counts as "contained" (shorter ones, like "a" or "jo", match by chance).
MIN_LOCAL_PART = 3

# Common passwords of the allowed length (from public breach corpora), compared case-insensitively.
COMMON_PASSWORDS: frozenset[str] = frozenset(
    {
        "123456789012",
        "1234567890123",
        "12345678901234",
        "123456789123",
        "111111111111",
        "000000000000",
        "123123123123",
        "1q2w3e4r5t6y",
        "1qaz2wsx3edc",
        "qwertyuiop12",
        "qwertyuiopas",
        "qwerty123456",
        "qwerty1234567",
        "qwertyqwerty",
        "asdfghjkl123",
        "zxcvbnm12345",
        "password1234",
        "password12345",
        "password123!",
        "passw0rd1234",
        "passwordpassword",
        "password1password",
        "mypassword123",
        "iloveyou1234",
        "iloveyouiloveyou",
        "letmein12345",
        "welcome12345",
        "welcome123456",
        "changeme1234",
        "changemenow!",
        "administrator",
        "administrator1",
        "admin1234567",
        "abcdefghijkl",
        "abc123abc123",
        "abcd1234abcd",
        "football1234",
        "baseball1234",
        "sunshine1234",
        "princess1234",
        "monkey123456",
        "dragon123456",
        "trustno1trustno1",
        "correcthorsebatterystaple",
    }
)


def check_password_strength(password: str, *, email: str, field: str) -> None:
    """Raise INVALID_ARGUMENT (naming `field`, with the reason) unless the password is acceptable."""
    if len(password) < MIN_LENGTH:
        raise weak_password(field, f"is too short: use at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise weak_password(field, f"is too long: use at most {MAX_LENGTH} characters")
    folded = password.casefold()
    if folded in COMMON_PASSWORDS or len(set(folded)) <= 2:
        raise weak_password(field, "is too common: choose one that is not on lists of leaked passwords")
    local_part = email.rpartition("@")[0].casefold()
    if len(local_part) >= MIN_LOCAL_PART and local_part in folded:
        raise weak_password(field, "must not contain your email address")


class PasswordHasher:
    """argon2id hashing and verification in a worker thread, plus a dummy verification for unknown accounts."""

    def __init__(self, *, time_cost: int = 3, memory_kib: int = 65_536, parallelism: int = 4) -> None:
        self._hasher = Argon2Hasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID)
        # A hash of a random password with the same parameters: verifying against it costs what a real
        # verification costs, so an unknown email answers as slowly as a wrong password.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        """The argon2id hash (PHC string) of a password."""
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        """Whether the password matches the hash (False for a malformed hash too)."""
        return await asyncio.to_thread(self._verify, password_hash, password)

    async def verify_dummy(self, password: str) -> None:
        """Spend the time of a verification without an account (timing equalisation)."""
        await asyncio.to_thread(self._verify, self._dummy_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether the hash was made with other parameters than the current ones."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
