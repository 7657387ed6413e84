"""The seeded chaos soak (tests/soak.py) as tests: a short form (2 seeds of 100 messages,
a few minutes) in every run, and the full one, marked slow, run only when asked:

    python -m pytest -m slow tests/test_soak.py      # the full one: 20 seeds of 500 messages (about an hour)

Each seed runs two real `blender-chat run` replicas on a private append-only Redis,
kills and restarts them, restarts Redis and cuts the network, and fails on any message
lost, answered twice or out of order, or stored twice, missing or out of order."""

from __future__ import annotations

import pytest
from soak import run_seeds, table


async def _soak(tmp_path, blenderbot_dir, seeds: list[int], messages: int, min_kills: int) -> None:
    lines: list[str] = []
    results = await run_seeds(seeds, messages, tmp_path, blenderbot_dir, min_kills=min_kills, out=lines.append)
    assert all(r.kills >= min_kills and r.redis_restarts == 1 for r in results), table(results)
    assert [r.seed for r in results if r.failures] == [], table(results) + "\n" + "\n".join(lines)


@pytest.mark.timeout(900)
async def test_a_short_soak_answers_every_message_once_in_order_through_kills_and_blips(tmp_path, blenderbot_dir):
    await _soak(tmp_path, blenderbot_dir, [1, 2], 100, min_kills=3)


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
async def test_the_full_soak_20_seeds_of_500_messages(tmp_path, blenderbot_dir):
    await _soak(tmp_path, blenderbot_dir, list(range(1, 21)), 500, min_kills=5)
