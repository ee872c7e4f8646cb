"""What generated methods may ask of the kernel: ``batos.search`` and ``batos.ask``.

One :class:`KernelServices` serves one invocation (batos_uvm.cells.invocation),
on that invocation's connection. Each service waits for the part of the
kernel it needs while the kernel is still loading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cells.invocation import Refused
from .config import PERSONAS

if TYPE_CHECKING:
    from .kernel import Kernel


class KernelServices:
    """The kernel services of one invocation: the catalog of its connection, the personas."""

    def __init__(self, kernel: Kernel, connection: Any) -> None:
        self.kernel, self.connection = kernel, connection

    async def search(self, query: str, top_k: int) -> list[dict[str, Any]]:
        from .kernel import CATALOG

        await self.kernel.readiness.wait(CATALOG)
        store = self.connection.root()["knowledge_catalog_obj"].store
        hits = await self.kernel.search(store, query, top_k)
        return [{"doc_id": h.doc_id, "text": h.text, "score": round(h.score, 4)} for h in hits]

    async def ask(self, persona: str, prompt: str) -> str:
        from .cognition import InferenceRequest
        from .kernel import MODELS

        if persona not in PERSONAS:
            raise Refused("ValueError", f"no persona {persona!r}; ask one of {', '.join(PERSONAS)}")
        await self.kernel.readiness.wait(MODELS)
        completion = await self.kernel.cognition.infer(
            InferenceRequest(persona=persona, prompt=prompt)
        )
        return completion.text
