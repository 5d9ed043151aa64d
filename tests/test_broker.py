"""The broker on its own: fan-out, order, replay, slow subscribers, clean-up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from hitl.broker import GLOBAL, HEARTBEAT, Broker, HistoryPage, Subscription
from hitl.models import Message, TaskEvent

from .conftest import within


def event(seq: int, status: str = "running", task_id: str = "t1") -> TaskEvent:
    return TaskEvent.create(task_id, seq, 100 + seq, {"task_id": task_id, "status": status})


def publish(broker: Broker, *events: TaskEvent) -> None:
    for item in events:
        on_task, on_global = item.messages()
        broker.publish(item.task_id, on_task)
        broker.publish(GLOBAL, on_global)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    broker = Broker(queue_size=8, history_size=50, heartbeat=0)
    await broker.start()
    yield broker
    await broker.close()


async def take(subscription: AsyncIterator[Message], count: int) -> list[int]:
    return [(await within(anext(subscription), 2, f"message {n + 1} of {count}")).id
            for n in range(count)]


async def rest(subscription: AsyncIterator[Message]) -> list[Message]:
    """What the subscription still yields, until it ends."""
    async def drain() -> list[Message]:
        return [message async for message in subscription]

    return await within(drain(), 2, "the subscription to end")


async def test_every_subscriber_gets_every_message_in_order(broker: Broker) -> None:
    async with broker.subscribe("t1") as a, broker.subscribe("t1") as b, \
            broker.subscribe(GLOBAL) as everything:
        publish(broker, *(event(n) for n in range(1, 6)))
        assert await take(a, 5) == [1, 2, 3, 4, 5]
        assert await take(b, 5) == [1, 2, 3, 4, 5]
        assert await take(everything, 5) == [101, 102, 103, 104, 105]


async def test_a_message_is_encoded_once_and_shared_by_subscribers(broker: Broker) -> None:
    async with broker.subscribe("t1") as a, broker.subscribe("t1") as b:
        publish(broker, event(1))
        first = await within(anext(a), 2, "the message on the first subscription")
        second = await within(anext(b), 2, "the message on the second subscription")
        assert first is second
        assert first.frame == b'id: 1\ndata: {"task_id":"t1","status":"running"}\n\n'


async def test_late_joiner_gets_the_history_first_then_live(broker: Broker) -> None:
    publish(broker, event(1, "pending"), event(2, "running"), event(3, "waiting_for_review"))
    async with broker.subscribe("t1") as late:
        assert await take(late, 3) == [1, 2, 3]
        publish(broker, event(4, "processing_feedback"))
        assert await take(late, 1) == [4]


async def test_last_event_id_replays_exactly_what_was_missed(broker: Broker) -> None:
    publish(broker, *(event(n) for n in range(1, 8)))
    async with broker.subscribe("t1", last_id=4) as back:
        publish(broker, event(8))
        assert await take(back, 4) == [5, 6, 7, 8]


async def test_global_topic_starts_live_unless_given_a_last_id(broker: Broker) -> None:
    publish(broker, event(1), event(2))
    async with broker.subscribe(GLOBAL) as live, broker.subscribe(GLOBAL, last_id=101) as back:
        publish(broker, event(3))
        assert await take(live, 1) == [103]
        assert await take(back, 2) == [102, 103]


async def test_history_beyond_memory_comes_from_the_loader() -> None:
    asked: list[tuple[str, int]] = []

    async def loader(topic: str, after: int, limit: int, max_bytes: int) -> HistoryPage:
        asked.append((topic, after))
        return HistoryPage([event(n).for_task() for n in range(after + 1, 4)], 3)

    broker = Broker(history_size=2, heartbeat=0, loader=loader)
    await broker.start()
    publish(broker, event(1), event(2), event(3))  # memory keeps 2 and 3 only
    async with broker.subscribe("t1", last_id=1) as from_memory:
        assert await take(from_memory, 2) == [2, 3]
    async with broker.subscribe("t1") as from_store:
        assert await take(from_store, 3) == [1, 2, 3]
    assert asked == [("t1", 0)]
    await broker.close()


async def test_slow_subscriber_is_dropped_without_slowing_the_others(broker: Broker) -> None:
    async with broker.subscribe("t1") as slow, broker.subscribe("t1") as fast:
        received: list[int] = []

        async def read_fast() -> None:
            async for message in fast:
                received.append(message.id)
                if message.id == 30:
                    return

        reader = asyncio.create_task(read_fast())
        for n in range(1, 31):
            publish(broker, event(n))  # never awaits: the slow one cannot hold it up
            await asyncio.sleep(0)
        await within(reader, 2, "the fast subscriber to get all 30")
        assert received == list(range(1, 31))
        assert slow.dropped and broker.subscriber_count("t1") == 1
        assert [m.id for m in await rest(slow)] == []  # it ends at once: its queue is let go
        assert broker.dropped_total == 1


async def test_subscribers_are_removed_at_once_when_they_leave(broker: Broker) -> None:
    async def watch() -> None:
        async with broker.subscribe("t1") as sub:
            async for _ in sub:
                pass

    publish(broker, event(1))
    watchers = [asyncio.create_task(watch()) for _ in range(10)]
    await asyncio.sleep(0.01)
    assert broker.subscriber_count("t1") == 10
    for watcher in watchers:
        watcher.cancel()
    await within(asyncio.gather(*watchers, return_exceptions=True), 2,
                 "the cancelled watchers to finish")
    assert broker.subscriber_count() == 0


async def test_released_topic_forgets_its_history_once_unwatched(broker: Broker) -> None:
    publish(broker, event(1), event(2, "completed"))
    async with broker.subscribe("t1"):
        broker.release("t1")
        assert broker.topic_count() == 1
    assert broker.topic_count() == 0


async def test_close_ends_every_stream(broker: Broker) -> None:
    async def drain() -> list[Message]:
        async with broker.subscribe("t1") as sub:
            return [message async for message in sub]

    reader = asyncio.create_task(drain())
    await asyncio.sleep(0.01)
    await broker.close()
    assert await within(reader, 1, "close to end the stream") == []
    async with broker.subscribe("t1") as after_close:
        assert await rest(after_close) == []


async def test_idle_subscribers_get_heartbeats() -> None:
    broker = Broker(heartbeat=0.02)
    await broker.start()
    async with broker.subscribe("t1") as sub:
        assert await within(anext(sub), 1, "a heartbeat") is HEARTBEAT
    await broker.close()


async def test_a_reconnect_storm_reads_the_store_once_and_forgets_a_finished_task() -> None:
    calls: list[tuple[str, int]] = []

    async def loader(topic: str, after: int, limit: int, max_bytes: int) -> HistoryPage:
        calls.append((topic, after))
        await asyncio.sleep(0.01)
        statuses = ["pending", "running", "waiting_for_review", "completed"]
        return HistoryPage([event(n, statuses[n - 1]).for_task() for n in range(after + 1, 5)], 4)

    broker = Broker(heartbeat=0, loader=loader)
    await broker.start()

    async def watch_until_terminal() -> list[int]:
        async with broker.subscribe("t1", last_id=2) as sub:
            return [m.id for m in await sub.batch()]

    results = await within(asyncio.gather(*(watch_until_terminal() for _ in range(50))), 5,
                           "fifty replays")
    assert results == [[3, 4]] * 50
    assert calls == [("t1", 2)]  # one read for all fifty
    assert broker.topic_count() == 0  # finished and unwatched: nothing kept
    await broker.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 2) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def test_a_watcher_cancelled_while_its_replay_loads_is_removed() -> None:
    gate = asyncio.Event()

    async def slow_loader(topic: str, after: int, limit: int, max_bytes: int) -> HistoryPage:
        await gate.wait()
        return HistoryPage([], 0)

    broker = Broker(heartbeat=0, loader=slow_loader)
    await broker.start()

    async def watch() -> None:
        async with broker.subscribe("t1", last_id=5):
            pass

    watcher = asyncio.create_task(watch())
    await wait_until(lambda: broker.subscriber_count() == 1)
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
    assert broker.subscriber_count() == 0 and broker.topic_count() == 0
    await broker.close()


async def test_a_watcher_whose_replay_fails_is_removed() -> None:
    async def broken_loader(topic: str, after: int, limit: int, max_bytes: int) -> HistoryPage:
        raise OSError("disk I/O error")

    broker = Broker(heartbeat=0, loader=broken_loader)
    await broker.start()
    with pytest.raises(OSError):
        async with broker.subscribe("t1", last_id=5):
            pass
    assert broker.subscriber_count() == 0 and broker.topic_count() == 0
    await broker.close()


async def test_watchers_sharing_one_read_miss_nothing_published_while_it_ran() -> None:
    stored = [event(n) for n in range(1, 8)]
    gate = asyncio.Event()

    async def loader(topic: str, after: int, limit: int, max_bytes: int) -> HistoryPage:
        seen = list(stored)  # a read sees what was committed when it started
        await gate.wait()
        return HistoryPage([e.for_task() for e in seen if e.seq > after], seen[-1].seq)

    def commit_and_publish(item: TaskEvent) -> None:
        stored.append(item)
        publish(broker, item)

    async def watch() -> list[int]:
        async with broker.subscribe("t1", last_id=5) as sub:
            return await take(sub, 4)

    broker = Broker(heartbeat=0, loader=loader)
    await broker.start()
    first = asyncio.create_task(watch())
    await wait_until(lambda: broker.subscriber_count() == 1)
    commit_and_publish(event(8))
    second = asyncio.create_task(watch())  # its replay joins the read in flight
    await wait_until(lambda: broker.subscriber_count() == 2)
    commit_and_publish(event(9))
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(first, second), 2) == [[6, 7, 8, 9]] * 2
    await broker.close()


async def test_replay_is_read_a_page_at_a_time_and_is_exact() -> None:
    stored = [event(n).for_global() for n in range(1, 2_001)]  # ids 101..2100
    pages: list[int] = []

    async def loader(topic: str, after: int, limit: int, max_bytes: int) -> HistoryPage:
        page = [m for m in stored if m.id > after][:limit]
        pages.append(len(page))
        return HistoryPage(page, stored[-1].id)

    broker = Broker(heartbeat=0, loader=loader, page_size=64)
    await broker.start()
    async with broker.subscribe(GLOBAL, last_id=150) as sub:
        got = [m.id for m in await asyncio.wait_for(take_all(sub, 1_950), 5)]
    assert got == list(range(151, 2_101))
    assert max(pages) == 64 and len(pages) == 31  # never the whole replay at once
    await broker.close()


async def take_all(sub: Subscription, count: int) -> list[Message]:
    messages: list[Message] = []
    while len(messages) < count:
        batch = await sub.batch()
        assert batch, "the stream ended early"
        messages.extend(batch)
    return messages


async def test_ids_missing_from_memory_are_a_reset_never_a_gap(broker: Broker) -> None:
    publish(broker, *(event(n) for n in range(1, 60)))  # memory keeps the last 50: 10..59
    async with broker.subscribe("t1", last_id=3) as far_back, \
            broker.subscribe("t1", last_id=80) as ahead:
        reset = await anext(far_back)  # a task's topic: its current state, marked reset
        assert (reset.status, reset.id) == ("running", 59)
        assert json.loads(reset.data)["replay"] == "reset"
        assert reset.frame.startswith(b"id: 59\ndata: {") and b'"replay":"reset"}' in reset.frame
        ahead_reset = await anext(ahead)
        assert ahead_reset.id == 59 and json.loads(ahead_reset.data)["replay"] == "reset"
        publish(broker, event(60))
        assert await take(far_back, 1) == [60] and await take(ahead, 1) == [60]
    assert broker.resets_total == 2


@pytest.mark.parametrize("ending", ["shutdown", "dropped", "cancelled", "client gone", "error"])
async def test_whatever_ends_a_subscription_it_is_removed_and_the_topic_freed(
    ending: str,
) -> None:
    broker = Broker(queue_size=4, heartbeat=0)
    await broker.start()
    publish(broker, event(1, "pending"))
    subscriptions: list[Subscription] = []
    blocked = asyncio.Event()  # a send that waits on a client that does not read

    async def watch(topic: str) -> None:
        async with broker.subscribe(topic) as sub:
            subscriptions.append(sub)
            if ending == "dropped":
                await blocked.wait()
            async for message in sub:
                if ending == "error" and message.id > 1:
                    raise RuntimeError("the handler failed")

    watchers = [asyncio.create_task(watch(topic)) for topic in ("t1", "t1", GLOBAL)]
    await wait_until(lambda: len(subscriptions) == 3)
    baseline = broker.subscriber_count()
    if ending == "shutdown":
        await broker.close()
    elif ending == "dropped":
        publish(broker, *(event(n) for n in range(2, 10)))
        assert broker.subscriber_count() == 0 and broker.dropped_total == 3  # at once
        assert all(not sub._queue for sub in subscriptions)  # what was queued is let go
        blocked.set()  # the send returns (or fails): the stream ends there
    elif ending == "cancelled":
        for watcher in watchers:
            watcher.cancel()
    elif ending == "client gone":
        for sub in subscriptions:
            sub.close()  # what the stream does when the client disconnects
    else:
        publish(broker, event(2))
        await asyncio.sleep(0.01)
        publish(broker, event(3))  # the global one gets 102 first, then 103
    publish(broker, event(10, "completed"))
    broker.release("t1")  # the task finished
    results = await asyncio.wait_for(asyncio.gather(*watchers, return_exceptions=True), 2)
    assert baseline == 3 and broker.subscriber_count() == 0
    assert broker.topic_count() == 0  # the finished task's topic and history are gone
    assert all(not sub._queue and not sub._backlog for sub in subscriptions)  # let go
    if ending == "error":
        assert all(isinstance(result, RuntimeError) for result in results)
    await broker.close()


async def test_a_finished_task_s_topic_is_freed_on_every_process(broker: Broker) -> None:
    """Each process's broker hears every task's news (hitl.redis_news): a task's history
    is kept only until its end, once nobody here watches it, not for as long as it runs."""
    for n in range(20):
        broker.publish_event(event(1, "pending", f"t{n}"))
        broker.publish_event(event(2, "completed", f"t{n}"))
    assert broker.topic_count() == 0  # (the global topic is not counted)
    broker.publish_event(event(1, "running", "live"))
    assert broker.topic_count() == 1
