"""Cognition from a local GGUF model through llama.cpp (``llama-cpp-python``, optional extra).

The model file is checked when the backend is built (it must exist and carry the
GGUF magic) and loaded once, on first use, in a worker thread; it then stays in
memory until ``close()``. llama.cpp objects are not thread safe, so one lock
serialises loading, generation and closing; the event loop only awaits.

When the GGUF carries a chat template (``tokenizer.chat_template``) the persona's
system prompt and the request become chat messages rendered by that template;
otherwise the text is completed as is (system prompt, blank line, prompt).
Each call starts from a fresh context, so the same request gives the same answer
whatever came before; temperature 0 (the default) decodes greedily. A request's
``prefix`` is written as the start of the model's turn and generation continues
from it; ``on_text`` receives the reply as it is generated.

Configuration (``LlamaCppBackend.from_config``):

``model_path``   required, path of the ``.gguf`` file (e.g. a committed blob of the image)
``n_ctx``        context window in tokens (2048)
``n_threads``    CPU threads (``min(2, os.cpu_count())``)
``temperature``  sampling temperature (0.0: greedy, deterministic)
``seed``         sampling seed when temperature > 0 (0)
``chat``         ``true``/``false`` to force or forbid the chat template (auto)
``sha256``       if given, the file must hash to it before it is loaded (once per process)
``name``         the model's name in records and logs (default: the file name)

Key ``backend`` is ignored; any other unknown key is an error.
Templates that refuse a ``system`` role get the system prompt at the head of the
user's turn instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
import time
from pathlib import Path
from typing import Any

from .base import CognitionError, CognitionUnavailable, Completion, InferenceRequest

GGUF_MAGIC = b"GGUF"
_INSTALL_HINT = "install the 'llama' extra: pip install 'batos[llama]'"
# llama-cpp-python silences model loading by redirecting the process's stdout and
# stderr; two loads at once would restore the wrong descriptors.
_LOAD_LOCK = threading.Lock()


class LlamaCppBackend:
    """Generates with llama.cpp from one GGUF file, kept loaded between calls."""

    name = "llama-cpp"

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        chat: bool | None = None,
        sha256: str | None = None,
        name: str | None = None,
    ) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise CognitionUnavailable(
                f"llama-cpp backend: llama_cpp is not installed; {_INSTALL_HINT}"
            )
        self.model_path = Path(model_path)
        _check_gguf(self.model_path)
        if n_ctx < 16:
            raise CognitionUnavailable(f"llama-cpp backend: n_ctx={n_ctx} is too small")
        self.n_ctx = int(n_ctx)
        self.n_threads = int(n_threads) if n_threads else min(2, os.cpu_count() or 1)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.chat = chat
        self.sha256 = sha256
        self.model_name = name or self.model_path.name
        self._llm: Any = None
        self._formatter: Any = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LlamaCppBackend:
        """Build from a config mapping (keys in the module docstring)."""
        known = {"model_path", "n_ctx", "n_threads", "temperature", "seed", "chat", "sha256", "name"}
        unknown = set(cfg) - known - {"backend"}
        if unknown:
            raise CognitionUnavailable(
                f"llama-cpp backend: unknown config keys {sorted(unknown)}; known: {sorted(known)}"
            )
        if not cfg.get("model_path"):
            raise CognitionUnavailable("llama-cpp backend: config key 'model_path' is required")
        kwargs = {k: cfg[k] for k in known - {"model_path"} if cfg.get(k) is not None}
        return cls(cfg["model_path"], **kwargs)

    def __repr__(self) -> str:
        return f"LlamaCppBackend(model_path={str(self.model_path)!r})"

    def describe(self) -> str:
        loaded = self._llm is not None
        state = "closed" if self._closed else "loaded" if loaded else "not loaded yet"
        return (
            f"llama-cpp: {self.model_name} ({self.model_path}), n_ctx {self.n_ctx}, "
            f"{self.n_threads} CPU thread(s), {state}"
        )

    @property
    def uses_chat_template(self) -> bool | None:
        """Whether prompts go through the model's chat template (None until loaded)."""
        return None if self._llm is None else self._formatter is not None

    async def load(self) -> None:
        """Load the model now rather than on the first ``infer``."""
        await asyncio.to_thread(self._locked, lambda: None)

    async def infer(self, request: InferenceRequest) -> Completion:
        return await asyncio.to_thread(self._locked, lambda: self._generate(request))

    async def close(self) -> None:
        # Waits for a generation in progress (in a thread, so the loop keeps running).
        await asyncio.to_thread(self._close_sync)

    # -- worker-thread side -----------------------------------------------------

    def _locked(self, work: Any) -> Any:
        with self._lock:
            if self._closed:
                raise CognitionError(f"llama-cpp backend for {self.model_path} is closed")
            if self._llm is None:
                self._load()
            return work()

    def _load(self) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:  # a broken build, e.g. a wheel for another CPU
            raise CognitionUnavailable(
                f"llama-cpp backend: cannot import llama_cpp ({exc})"
            ) from None
        _check_gguf(self.model_path)  # it may have gone since construction
        if self.sha256:
            from ..weight_views import FileRef, WeightError, verify_files

            ref = FileRef(self.model_path.name, str(self.model_path),
                          self.model_path.stat().st_size, self.sha256)  # fmt: skip
            try:
                verify_files([ref], f"llama-cpp model {self.model_path.name}")
            except WeightError as exc:
                raise CognitionError(f"llama-cpp backend: {exc}; nothing was loaded") from None
        try:
            with _LOAD_LOCK:
                llm = Llama(
                    model_path=str(self.model_path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    seed=self.seed,
                    verbose=False,
                )
        except Exception as exc:  # llama.cpp reports a bad file as ValueError
            raise CognitionError(
                f"llama-cpp backend: cannot load GGUF model {self.model_path}: {exc}"
            ) from None
        template = llm.metadata.get("tokenizer.chat_template")
        use_chat = bool(template) if self.chat is None else self.chat
        if use_chat and not template:
            llm.close()
            raise CognitionError(
                f"llama-cpp backend: chat=true but {self.model_path} has no chat template"
            )
        self._formatter = None
        if use_chat:
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(llm, llm.token_eos()),
                bos_token=_token_text(llm, llm.token_bos()),
            )
        self._llm = llm

    def _prompt_tokens(self, request: InferenceRequest) -> tuple[list[int], list[str]]:
        llm = self._llm
        if self._formatter is None:
            text = f"{request.system}\n\n{request.prompt}" if request.system else request.prompt
            text += request.prefix
            return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True), []
        messages = [{"role": "user", "content": request.prompt}]
        if request.system:
            messages.insert(0, {"role": "system", "content": request.system})
        try:
            rendered = self._formatter(messages=messages)
        except Exception:
            if not request.system:
                raise
            # Some templates refuse a system role: fold it into the user's turn.
            merged = f"{request.system}\n\n{request.prompt}"
            rendered = self._formatter(messages=[{"role": "user", "content": merged}])
        # The template writes any BOS it wants itself, as in llama-cpp-python's chat path.
        text = rendered.prompt + request.prefix  # the prefix opens the model's turn
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        stop = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        return tokens, [s for s in stop if s]

    def _generate(self, request: InferenceRequest) -> Completion:
        from llama_cpp import LogitsProcessorList, StoppingCriteriaList

        llm = self._llm
        try:
            tokens, template_stop = self._prompt_tokens(request)
        except Exception as exc:  # a template that raises, text it cannot tokenize
            raise CognitionError(
                f"llama-cpp backend: cannot build the prompt for {self.model_path.name}: {exc}"
            ) from None
        if len(tokens) >= self.n_ctx:
            raise CognitionError(
                f"llama-cpp backend: prompt of {len(tokens)} tokens does not fit "
                f"n_ctx={self.n_ctx} of {self.model_path.name}"
            )
        max_tokens = max(1, min(int(request.max_tokens), self.n_ctx - len(tokens)))
        capped, sampled = _TokenCap(max_tokens), _Counter()
        stops = [*request.stop, *(request.prefix_stop if request.prefix else ()), *template_stop]
        temperature = self.temperature if request.temperature is None else request.temperature
        seed = self.seed if request.seed is None else request.seed
        # A request's own temperature asks for variety (a retry): sample from the 40 likeliest
        # tokens without llama.cpp's top-p/min-p cut, which leaves a confident small model
        # one candidate per token, whatever the temperature.
        spread = {"top_p": 1.0, "min_p": 0.0} if request.temperature else {}
        llm.reset()  # no KV reuse from an earlier call: same request, same answer
        start = time.perf_counter()
        pieces: list[str] = []
        finish = None
        try:
            for chunk in llm.create_completion(
                tokens,
                max_tokens=max_tokens,
                temperature=temperature,
                stop=stops,
                seed=seed,
                **spread,
                stopping_criteria=StoppingCriteriaList([capped]),
                logits_processor=LogitsProcessorList([sampled]),
                stream=True,
            ):
                choice = chunk["choices"][0]
                if choice.get("text"):
                    pieces.append(choice["text"])
                    if request.on_text is not None:
                        request.on_text(choice["text"])
                finish = choice.get("finish_reason") or finish
        except Exception as exc:
            raise CognitionError(
                f"llama-cpp backend: generation with {self.model_path} failed: {exc}"
            ) from None
        seconds = time.perf_counter() - start
        text = "".join(pieces)
        finish = "length" if capped.fired else finish
        # One sample per token; the end-of-generation token is sampled but not output, and
        # the cap fires only after sampling one token past the limit.
        if capped.fired:
            completion_tokens = max_tokens
        else:
            eog = finish == "stop" and not any(s in text for s in stops)
            completion_tokens = sampled.count - eog
        # llama-cpp-python matches stops on bytes and skips the check while a token ends
        # inside a UTF-8 character; cut the text as the caller sees it, too.
        cuts = [text.find(s) for s in stops if s and s in text]
        if cuts:
            text, finish = text[: min(cuts)], "stop"
        return Completion(
            text=request.prefix + text,
            backend=self.name,
            model=self.model_name,
            prompt_tokens=len(tokens),
            completion_tokens=completion_tokens,
            details={
                "model_path": str(self.model_path),
                "chat_template": self._formatter is not None,
                "finish_reason": finish,
                "prefixed": bool(request.prefix),
                "temperature": temperature,
                "seed": seed,
                "seconds": round(seconds, 4),
                "tokens_per_second": round(completion_tokens / seconds, 1) if seconds else None,
            },
        )

    def _close_sync(self) -> None:
        with self._lock:
            self._closed = True
            llm, self._llm = self._llm, None
            if llm is not None:
                llm.close()


class _TokenCap:
    """Stops generation after exactly ``limit`` new tokens.

    llama-cpp-python's own ``max_tokens`` check is skipped while a token ends in the
    middle of a UTF-8 character, so a call could overrun it by a few tokens.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.prompt_len: int | None = None
        self.fired = False

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        # Called after each sampled token with the ids evaluated so far; the first
        # call sees exactly the prompt.
        if self.prompt_len is None:
            self.prompt_len = len(input_ids)
        if len(input_ids) - self.prompt_len >= self.limit:
            self.fired = True
        return self.fired


class _Counter:
    """A logits processor that only counts: it runs once per sampled token."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.count += 1
        return scores


def _token_text(llm: Any, token: int) -> str:
    if token is None or token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="ignore")


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise CognitionError(f"llama-cpp backend: GGUF model file {path} does not exist")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CognitionError(f"llama-cpp backend: cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise CognitionError(f"llama-cpp backend: {path} is not a GGUF file (bad magic {magic!r})")
