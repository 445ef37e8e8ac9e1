"""HookIndex: mitmproxy's dispatch semantics, visiting only the addons that implement a hook."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import exceptions, hooks, options
from mitmproxy.addonmanager import AddonManager
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook

from proxy.dispatch import HookIndex, KeylessMaster


class Recorder:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def running(self) -> None:
        self.calls.append(self.name)


class Quiet:
    name = "quiet"


class Halting:
    name = "halting"

    def running(self) -> None:
        raise exceptions.AddonHalt()


class Broken:
    name = "broken"

    def running(self) -> None:
        raise RuntimeError("boom")


class Container:
    """Like mitmproxy's ScriptLoader: sub-addons come and go after the chain is built."""

    name = "container"

    def __init__(self) -> None:
        self.addons: list[Any] = []


async def new_master() -> KeylessMaster:
    return KeylessMaster(options.Options())


def close(master: KeylessMaster) -> None:
    master.addons.clear()
    master._legacy_log_events.uninstall()  # its log handler would outlive this event loop


def with_master(test: Any) -> Any:
    def run(*args: Any) -> None:
        async def body() -> None:
            master = await new_master()
            try:
                await test(master, *args)
            finally:
                close(master)
        asyncio.run(body())
    run.__name__ = test.__name__
    return run


@with_master
async def test_keyless_master_uses_the_index_and_only_it_reacts_to_options(master) -> None:
    assert isinstance(master.addons, HookIndex)
    seen: list[set[str]] = []

    class Configured:
        name = "configured"

        def configure(self, updated: set[str]) -> None:
            seen.append(updated)

    master.addons.add(Configured())
    seen.clear()
    master.options.update(listen_port=1234)
    assert seen == [{"listen_port"}]  # once: the replaced manager no longer listens


@with_master
async def test_order_is_the_chain_and_addons_without_the_hook_are_skipped(master) -> None:
    calls: list[str] = []
    master.addons.add(Recorder("a", calls), Quiet(), Recorder("b", calls))
    await master.addons.trigger_event(hooks.RunningHook())
    assert calls == ["a", "b"]
    assert [getattr(a, "name", None) for a, _ in master.addons.visited("running")] == ["a", "b"]
    assert master.addons.visited("request") == []


def test_addon_halt_stops_the_chain_and_errors_stay_with_their_addon(caplog) -> None:
    with caplog.at_level(logging.ERROR):
        with_master(halt_and_error)()
    assert "Addon error: boom" in caplog.text


async def halt_and_error(master: KeylessMaster) -> None:
    calls: list[str] = []
    master.addons.add(Recorder("a", calls), Broken(), Recorder("b", calls), Halting(),
                      Recorder("c", calls))
    await master.addons.trigger_event(hooks.RunningHook())
    assert calls == ["a", "b"]
    calls.clear()
    master.addons.trigger(hooks.RunningHook())  # the sync path behaves the same
    assert calls == ["a", "b"]


@with_master
async def test_the_index_follows_the_chain(master) -> None:
    calls: list[str] = []
    first = Recorder("a", calls)
    master.addons.add(first)
    await master.addons.trigger_event(hooks.RunningHook())
    master.addons.add(Recorder("b", calls))
    await master.addons.trigger_event(hooks.RunningHook())
    master.addons.remove(first)
    await master.addons.trigger_event(hooks.RunningHook())
    assert calls == ["a", "a", "b", "b"]


@with_master
async def test_containers_are_always_visited_so_late_sub_addons_get_events(master) -> None:
    calls: list[str] = []
    container = Container()
    master.addons.add(container)
    await master.addons.trigger_event(hooks.RunningHook())
    container.addons.append(Recorder("script", calls))  # e.g. a script loaded later
    await master.addons.trigger_event(hooks.RunningHook())
    assert calls == ["script"]


def test_same_calls_as_mitmproxys_manager() -> None:
    """Both managers, the same chain: the same calls in the same order."""
    async def calls_with(manager_type: type[AddonManager]) -> list[str]:
        master = await new_master()
        master.addons = manager_type(master)
        calls: list[str] = []
        master.addons.add(Quiet(), Recorder("a", calls), Broken(), Recorder("b", calls),
                          Container())
        for _ in range(3):
            await master.addons.trigger_event(hooks.RunningHook())
        close(master)
        return calls

    assert asyncio.run(calls_with(HookIndex)) == asyncio.run(calls_with(AddonManager)) \
        == ["a", "b"] * 3


class AsyncRecorder:
    """An async hook gets the event's arguments and is awaited before the next addon runs."""

    name = "async"

    def __init__(self, calls: list[str], fail: bool = False) -> None:
        self.calls, self.fail = calls, fail

    async def requestheaders(self, flow: Any) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"async {flow}")
        if self.fail:
            raise RuntimeError("async boom")


class FlowRecorder:
    name = "flow"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def requestheaders(self, flow: Any) -> None:
        self.calls.append(f"sync {flow}")


def test_async_handlers_are_awaited_in_order_and_their_errors_logged(caplog) -> None:
    calls: list[str] = []

    async def body(master: KeylessMaster) -> None:
        master.addons.add(AsyncRecorder(calls, fail=True), FlowRecorder(calls))
        await master.addons.trigger_event(HttpRequestHeadersHook("the-flow"))  # type: ignore[arg-type]

    with caplog.at_level(logging.ERROR):
        with_master(body)()
    assert calls == ["async the-flow", "sync the-flow"]
    assert "Addon error: async boom" in caplog.text
