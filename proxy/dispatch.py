"""Hook dispatch that only visits the addons implementing a hook.

mitmproxy's AddonManager offers every event to every addon in the chain, each inside its own
context manager, and follows every flow event with an `update` event nobody in keyless
implements. With ~40 addons and ~10 events per request that was about 40 % of keyless' CPU
under load (py-spy, docs/benchmarks.md). HookIndex keeps mitmproxy's semantics (chain order,
error isolation per addon, AddonHalt) and remembers per hook which top-level addons implement
it. Containers of addons (mitmproxy's ScriptLoader: user scripts come and go) are always
visited, so `--set scripts=...` keeps working.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, hooks, master
from mitmproxy.addonmanager import AddonManager, safecall, traverse


def implements(addon: Any, hook: str) -> bool:
    return any(callable(getattr(a, hook, None)) for a in traverse([addon]))


class HookIndex(AddonManager):
    def __init__(self, proxy_master: master.Master) -> None:
        super().__init__(proxy_master)
        self._visit: dict[str, list[tuple[Any, Callable[..., Any] | None]]] = {}
        self._indexed: tuple[int, int] = (0, -1)

    def visited(self, hook: str) -> list[tuple[Any, Callable[..., Any] | None]]:
        """The addons to visit for `hook`, each with its handler; None for a container,
        whose children are looked up on each call as mitmproxy does."""
        # add() appends to the chain, remove() and clear() replace it: identity plus length
        # tells whether the index is current, without walking the chain.
        state = (id(self.chain), len(self.chain))
        if state != self._indexed:
            self._visit.clear()
            self._indexed = state
        visit = self._visit.get(hook)
        if visit is None:
            visit = [(a, None) if hasattr(a, "addons") else (a, getattr(a, hook))
                     for a in self.chain if hasattr(a, "addons") or implements(a, hook)]
            self._visit[hook] = visit
        return visit

    async def trigger_event(self, event: hooks.Hook) -> None:
        args: list[Any] | None = None  # the same for every addon: listed once
        for addon, handler in self.visited(event.name):
            try:
                if handler is None:
                    with safecall():
                        await self.invoke_addon(addon, event)
                    continue
                if args is None:
                    args = event.args()
                try:
                    result = handler(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
                except exceptions.AddonHalt:
                    raise
                except Exception:
                    with safecall():  # mitmproxy's own report of an addon's error
                        raise
            except exceptions.AddonHalt:
                return

    def trigger(self, event: hooks.Hook) -> None:
        for addon, _ in self.visited(event.name):
            try:
                with safecall():
                    self.invoke_addon_sync(addon, event)
            except exceptions.AddonHalt:
                return


class KeylessMaster(master.Master):
    """mitmproxy's Master with HookIndex as its addon manager."""

    def __init__(self, opts: Any) -> None:
        super().__init__(opts)
        self.options.changed.disconnect(self.addons._configure_all)
        self.addons = HookIndex(self)
