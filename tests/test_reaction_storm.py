"""SPEC §30 under load: a reaction storm from three OS processes, with redeliveries,
ends with exactly the counts a model of the events gives."""

from __future__ import annotations

import random
import re
from collections import defaultdict

import orjson
import pytest
import redis.asyncio as aioredis
from multiproc import run_in_processes
from redis_servers import RedisServer
from workers import react_storm

from conversation import ConversationManager
from conversation._reactions import normalise_emoji
from conversation.testing import room_keys

pytestmark = pytest.mark.real_server

MESSAGES = [f"m{i}" for i in range(4)]
EMOJI = ["👍", "😂", "🎉", "<:party:4242>", "👨‍👩‍👧", "🔥"]
USERS = [f"user{i}" for i in range(25)]
EVENTS, REDELIVERED, PROCESSES = 500, 0.2, 3

Delivery = tuple[str, str, str, str]  # action, message, emoji, user
Key = tuple[str, str, str]  # message, emoji, user


def storm(seed: int) -> tuple[list[list[Delivery]], dict[Key, bool], int]:
    """Each process's deliveries, the model (who holds which reaction at the end) and
    how many deliveries were redeliveries.

    Events are what a platform sends: for one (message, emoji, user), adds and
    removes alternate. The gateway shard that owns a key delivers its events in
    order; a redelivery of an event comes again from that shard right after it,
    or, for a key's last event, from any process at any moment (the only
    redelivery whose arrival order cannot change the outcome).
    """
    rng = random.Random(seed)
    holds: dict[Key, bool] = {}
    originals: list[tuple[Key, str]] = []
    for _ in range(EVENTS):
        key = (rng.choice(MESSAGES), rng.choice(EMOJI), rng.choice(USERS))
        action = "remove" if holds.get(key) else "add"
        holds[key] = action == "add"
        originals.append((key, action))
    last = {key: number for number, (key, _) in enumerate(originals)}
    owner = {key: rng.randrange(PROCESSES) for key in sorted(holds)}
    plans: list[list[Delivery]] = [[] for _ in range(PROCESSES)]
    late: list[tuple[int, Delivery]] = []
    redelivered = rng.sample(range(EVENTS), int(EVENTS * REDELIVERED))
    for number, (key, action) in enumerate(originals):
        delivery = (action, *key)
        plans[owner[key]].append(delivery)
        if number in redelivered:
            if last[key] == number:
                late.append((rng.randrange(PROCESSES), delivery))
            else:
                plans[owner[key]].append(delivery)
    for process, delivery in late:
        plans[process].insert(rng.randrange(len(plans[process]) + 1), delivery)
    return plans, holds, len(redelivered)


def model_counts(holds: dict[Key, bool]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (message, emoji, _user), held in holds.items():
        if held:
            counts[message][emoji] = counts[message].get(emoji, 0) + 1
    return counts


SHOWN = {"<:party:4242>": ":party:"}


def tag_counts(text: str) -> dict[str, int]:
    match = re.search(r"\[Reactions: ([^\]]*)\]", text)
    if match is None:
        return {}
    shown_to_key = {SHOWN.get(e, e): e for e in EMOJI}
    pairs = [item.rsplit(" ", 1) for item in match.group(1).split(", ")]
    counts = [int(count) for _, count in pairs]
    assert counts == sorted(counts, reverse=True), f"not by count, highest first: {text}"
    return {shown_to_key[shown]: int(count) for shown, count in pairs}


async def test_reaction_storm_across_three_processes_counts_exactly(
    redis_server: RedisServer, room: str
) -> None:
    plans, holds, redelivered = storm(seed=16)
    deliveries = sum(len(plan) for plan in plans)
    assert (deliveries, redelivered) == (EVENTS + 100, 100)
    client = aioredis.Redis(port=redis_server.port)
    seeder = ConversationManager(None, redis=client)
    try:
        for message in MESSAGES:
            await seeder.append_async(room, "user", f"[Message ID: {message}] look at this")
        await seeder.aclose()
        results = run_in_processes(react_storm, [(redis_server.port, room, plan) for plan in plans])
        stored = {m: await client.hget(room_keys(room).reactions, m) for m in MESSAGES}
    finally:
        await client.aclose()
    expected = model_counts(holds)
    windows = [result["window"] for result in results]
    assert windows[0] == windows[1] == windows[2]
    for message, text in zip(MESSAGES, windows[0], strict=True):
        assert text.startswith(f"[Message ID: {message}]")
        assert tag_counts(text) == expected.get(message, {}), text
    # The stored sets are the model's, user for user.
    for message in MESSAGES:
        raw = stored[message]
        state = orjson.loads(raw.split(b"|", 1)[1]) if isinstance(raw, bytes) else []
        users = {(emoji, user) for emoji, _shown, names in state for user in names}
        # (a custom emoji is stored by its id: normalise_emoji gives the key)
        assert users == {
            (normalise_emoji(e).key, u)
            for (m, e, u), held in holds.items()
            if held and m == message
        }
    assert sum(result["stats"]["reactions"] for result in results) == deliveries
    # Reactions change a row only inside its tag: other workers' never conflict.
    assert [result["stats"]["conflicts"] for result in results] == [0, 0, 0]
