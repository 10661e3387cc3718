"""dispatch.peers: when a replica may leave its notifications out, and what it owes the others
once it may not."""

from __future__ import annotations

import asyncio

import pytest

from control_plane.dispatch.peers import Peers


class Fakes:
    def __init__(self, others: int = 0) -> None:
        self.others = others
        self.hinted: list[list[str]] = []

    async def hint(self, workspaces: list[str]) -> None:
        self.hinted.append(workspaces)

    async def count_others(self) -> int:
        return self.others


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _alone(fakes: Fakes) -> Peers:
    peers = Peers(hint=fakes.hint, count_others=fakes.count_others)
    peers.listening(True)
    await _settle()
    assert peers.alone
    return peers


async def test_a_replica_is_alone_only_once_listening_and_counted_alone() -> None:
    fakes = Fakes(others=0)
    peers = Peers(hint=fakes.hint, count_others=fakes.count_others)
    peers.observed(peers.mark(), others=0)
    assert not peers.alone, "not listening: an announcement would go unheard"
    assert not peers.quiet_write()

    peers.listening(True)  # counts the others at once
    await _settle()
    assert peers.alone
    assert peers.quiet_write()
    peers.quiet_done(["ws"])

    peers.observed(peers.mark(), others=1)
    assert not peers.alone
    assert not peers.quiet_write()


async def test_a_count_taken_before_a_sign_of_company_does_not_make_it_alone() -> None:
    fakes = Fakes()
    peers = await _alone(fakes)
    mark = peers.mark()
    peers.company()  # an announcement arrives while the count is under way
    peers.observed(mark, others=0)
    assert not peers.alone
    peers.observed(peers.mark(), others=0)
    assert peers.alone


async def test_losing_the_listen_connection_ends_quiet_at_once() -> None:
    fakes = Fakes()
    peers = await _alone(fakes)
    peers.listening(False)
    assert not peers.alone
    peers.observed(peers.mark(), others=0)
    assert not peers.alone, "nobody would hear a newcomer"


async def test_hints_go_out_once_the_quiet_writes_have_ended() -> None:
    fakes = Fakes()
    peers = await _alone(fakes)
    assert peers.quiet_write()
    peers.quiet_done(["a"])
    assert peers.quiet_write()  # still open when company arrives
    peers.company()
    assert not peers.quiet_write(), "writes after the news notify"
    await _settle()
    assert fakes.hinted == [], "a quiet write is still open"

    peers.quiet_done(["b", "c"])
    await _settle()
    assert fakes.hinted == [["a", "b", "c"]]

    peers.observed(peers.mark(), others=0)  # alone again, with nothing written: nothing to hint
    peers.company()
    await _settle()
    assert fakes.hinted == [["a", "b", "c"]]
    peers.close()


async def test_a_failed_hint_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def failing(_workspaces: list[str]) -> None:
        raise OSError("database gone")

    fakes = Fakes()
    peers = Peers(hint=failing, count_others=fakes.count_others)
    peers.listening(True)
    await _settle()
    assert peers.quiet_write()
    peers.quiet_done(["a"])
    peers.company()
    await _settle()
    assert not peers.alone
    assert "could not hint 1 workspaces" in caplog.text
    peers.close()
