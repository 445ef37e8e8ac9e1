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

from typing import Any

from mitmproxy import exceptions, hooks, master
from mitmproxy.addonmanager import AddonManager, safecall, traverse


def implements(addon: Any, hook: str) -> bool:
    return any(callable(getattr(a, hook, None)) for a in traverse([addon]))


class HookIndex(AddonManager):
    def __init__(self, proxy_master: master.Master) -> None:
        super().__init__(proxy_master)
        self._visit: dict[str, list[Any]] = {}
        self._indexed: tuple[int, int] = (0, -1)

    def visited(self, hook: str) -> list[Any]:
        # add() appends to the chain, remove() and clear() replace it: identity plus length
        # tells whether the index is current, without walking the chain.
        state = (id(self.chain), len(self.chain))
        if state != self._indexed:
            self._visit.clear()
            self._indexed = state
        visit = self._visit.get(hook)
        if visit is None:
            visit = [a for a in self.chain if hasattr(a, "addons") or implements(a, hook)]
            self._visit[hook] = visit
        return visit

    async def trigger_event(self, event: hooks.Hook) -> None:
        for addon in self.visited(event.name):
            try:
                with safecall():
                    await self.invoke_addon(addon, event)
            except exceptions.AddonHalt:
                return

    def trigger(self, event: hooks.Hook) -> None:
        for addon in self.visited(event.name):
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
