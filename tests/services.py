"""The real PostgreSQL and Redis of this machine, for the tests of a shared deployment.

``postgres_url`` is a throwaway database of its own per test (created from the admin URL
in ``HITL_TEST_POSTGRES``, dropped after); ``redis_url`` the Redis of ``HITL_TEST_REDIS``
with a key prefix of its own per test. Where no server can be reached they skip, saying
"needs PostgreSQL" or "needs Redis"; CI sets ``HITL_REQUIRE_SERVICES=1``, which makes
such a skip a failure (tests/conftest.py), so the shared paths are never silently untested.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

POSTGRES = os.environ.get("HITL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("HITL_TEST_REDIS", "redis://127.0.0.1:6379/0")
SKIP_REASONS = ("needs PostgreSQL", "needs Redis")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


async def create_database() -> str:
    """A new empty database on the test server; its URL."""
    import asyncpg

    name = f"hitl_t_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncio.wait_for(asyncpg.connect(POSTGRES), 5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.skip(f"needs PostgreSQL at {POSTGRES}: {exc}")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(POSTGRES, name)


async def drop_database(url: str) -> None:
    import asyncpg

    name = urlsplit(url).path.lstrip("/")
    conn = await asyncio.wait_for(asyncpg.connect(POSTGRES), 5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    url = await create_database()
    yield url
    await drop_database(url)


async def check_redis() -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS, socket_connect_timeout=2)
    try:
        await asyncio.wait_for(client.ping(), 5)
    except (OSError, redis.RedisError, TimeoutError) as exc:
        pytest.skip(f"needs Redis at {REDIS}: {exc}")
    finally:
        await client.aclose()


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """The test Redis, with a key prefix of this test's own (its keys deleted after)."""
    import redis.asyncio as redis

    await check_redis()
    prefix = f"hitl-t-{uuid.uuid4().hex[:12]}"
    yield f"{REDIS}?prefix={prefix}"
    client = redis.Redis.from_url(REDIS)
    try:
        keys = [key async for key in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
