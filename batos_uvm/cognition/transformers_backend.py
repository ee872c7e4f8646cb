"""The ``transformers`` backend: persona models from the image, run with ``transformers``.

Loading, sharing, swapping and unloading the models within a memory budget is
:class:`~batos_uvm.cognition.model_manager.ModelManager`'s job; this module turns
an :class:`InferenceRequest` into a generation on a leased model.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .base import CognitionError, CognitionUnavailable, Completion, InferenceRequest
from .model_manager import GiB, Lease, ModelManager, release_manager, shared_manager


class TransformersBackend:
    """Persona models from the image, run with ``transformers`` (greedy by default).

    ``db`` is the image's ``ZODB.DB``; the backend opens its own connection to read
    the weight library at ``root['pLLM_obj'].weights``. Other keyword options go to
    :class:`ModelManager` unless a ``manager`` is given.
    """

    name = "transformers"

    def __init__(
        self,
        db: Any,
        *,
        manager: ModelManager | None = None,
        max_new_tokens: int = 1024,
        max_time: float | None = 300.0,
        temperature: float = 0.0,
        **manager_options: Any,
    ) -> None:
        self.manager = manager or ModelManager(db, **manager_options)
        self.max_new_tokens, self.max_time, self.temperature = max_new_tokens, max_time, temperature
        self._closed = False
        self._release = self.manager.close if manager is None else lambda: None

    MANAGER_KEYS = ("device", "budget_gb", "load_in_4bit", "dtype", "verify", "wait_timeout")
    BACKEND_KEYS = ("max_new_tokens", "max_time", "temperature")

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, db: Any) -> TransformersBackend:
        """Build from a config table; personas with equal manager keys share one manager."""
        unknown = set(cfg) - set(cls.MANAGER_KEYS) - set(cls.BACKEND_KEYS) - {"backend", "name"}
        if unknown:
            raise CognitionUnavailable(
                f"transformers backend: unknown config keys {sorted(unknown)}; known: "
                f"{sorted(cls.MANAGER_KEYS + cls.BACKEND_KEYS)}"
            )
        options = {k: cfg[k] for k in cls.MANAGER_KEYS if cfg.get(k) is not None}
        if "budget_gb" in options:
            options["budget_bytes"] = int(float(options.pop("budget_gb")) * GiB)
        manager = shared_manager(db, **options)
        backend = cls(db, manager=manager, **{k: cfg[k] for k in cls.BACKEND_KEYS if k in cfg})
        backend._release = lambda: release_manager(manager)
        return backend

    async def infer(self, request: InferenceRequest) -> Completion:
        if self._closed:
            raise CognitionError("the transformers backend is closed")
        async with self.manager.lease(request.persona) as lease:
            return await asyncio.to_thread(self._generate, lease, request)

    def _generate(self, lease: Lease, request: InferenceRequest) -> Completion:
        import torch

        started = time.perf_counter()
        with lease.activated() as (model, tokenizer):
            ids = _encode(tokenizer, request).to(model.device)
            prompt_tokens = int(ids.shape[1])
            budget = min(max(1, request.max_tokens), self.max_new_tokens)
            context = getattr(model.config, "max_position_embeddings", None)
            if context:
                budget = min(budget, context - prompt_tokens)
                if budget <= 0:
                    raise CognitionError(
                        f"prompt is {prompt_tokens} tokens; {lease.model_name} holds {context}"
                    )
            pad = tokenizer.pad_token_id
            pad = pad if pad is not None else tokenizer.eos_token_id
            options: dict[str, Any] = {"max_new_tokens": budget, "pad_token_id": pad}
            if self.temperature > 0:
                options.update(do_sample=True, temperature=self.temperature)
            else:
                options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if self.max_time:
                options["max_time"] = self.max_time
            if request.stop:
                options.update(stop_strings=list(request.stop), tokenizer=tokenizer)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        new = out[0, prompt_tokens:].tolist()
        while new and new[-1] == pad:  # padding after an early stop is not output
            new.pop()
        text = tokenizer.decode(new, skip_special_tokens=True)
        for stop in request.stop:  # generation halts after the stop string; drop it
            if stop and stop in text:
                text = text[: text.index(stop)]
        return Completion(
            text=text,
            backend=self.name,
            model=lease.model_name,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new),
            details={
                "adapter": lease.adapter,
                "device": self.manager.device,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )

    def describe(self) -> str:
        m = self.manager
        mode = "4-bit NF4" if m.load_in_4bit else m.dtype
        loaded = ", ".join(e["name"] for e in m.loaded()) or "none"
        return (
            f"transformers on {m.device} ({mode}, budget {m.budget / GiB:.1f} GiB); "
            f"loaded: {loaded}"
        )

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._release)


def _encode(tokenizer: Any, request: InferenceRequest) -> Any:
    """Token ids for the request, through the persona's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": request.prompt}]
        if request.system:
            messages.insert(0, {"role": "system", "content": request.system})
        try:
            encoded = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            return encoded["input_ids"]
        except Exception:  # some templates refuse a system turn: fold it into the user's
            if not request.system:
                raise
            merged = [{"role": "user", "content": f"{request.system}\n\n{request.prompt}"}]
            encoded = tokenizer.apply_chat_template(
                merged, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            return encoded["input_ids"]
    text = f"{request.system}\n\n{request.prompt}" if request.system else request.prompt
    return tokenizer(text, return_tensors="pt")["input_ids"]
