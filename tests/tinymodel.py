"""Build tiny Llama-architecture models and LoRA adapters locally, for tests and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with ``tokenizers``
on the text below (plus deterministic pseudo-words when a larger vocabulary is
asked for), wrapped as ``PreTrainedTokenizerFast`` with a small chat template.

    build_tiny_llama(path, hidden=64, layers=2)            # ~1 MB, < 1 s
    build_tiny_llama(path, hidden=512, layers=8, vocab=4096)  # ~100 MB benchmark model
    build_lora_adapter(base_path, out_path, seed=1)        # PEFT adapter on that base
    TinyImage(tmp_path)                                     # FileStorage + blobs + pLLM_obj

The model's ``vocab_size`` always equals ``len(tokenizer)`` (``vocab`` is a target:
BPE training stops early when the text has no more pairs to merge), so a GGUF
writer can copy the vocabulary one-to-one onto the embedding rows.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import persistent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TRAINING_TEXT = """\
The living image keeps every object of the system in one database. When a message
reaches an object that does not understand it, the kernel starts a cognitive cycle:
the personas plan, search the knowledge catalog, write the missing method, and a
guardian checks the code before it is installed. ALFRED keeps the books and asks
what a change will cost. BRICK builds things and explains them at length. ROBIN
looks for the gentle path and the meaning in the work. BABS goes out to find facts
and brings them back with their sources. Nothing changes unless the whole cycle
succeeds; a failed cycle leaves only its record behind. Persistence means that a
restart finds the system as it was: the objects, their methods, the catalog and
the weights of the models all live in the image. def add(self, a, b): return a + b
def greet(self, name): return 'Hello, ' + name + '!' for item in items: print(item)
class Counter: count = 0; value = 1; total = 2; x = [1, 2, 3]; y = {"k": "v"}
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _pseudo_words(n: int, seed: int) -> list[str]:
    """Deterministic made-up words so BPE can keep merging up to a large vocabulary."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 5))) for _ in range(n)]


def build_tokenizer(vocab: int = 512, seed: int = 0):
    """Train a byte-level BPE tokenizer; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [TRAINING_TEXT]
    if vocab > 600:  # the text alone runs out of pairs around a few hundred merges
        words = _pseudo_words(vocab * 4, seed)
        corpus += [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(
    path: str | os.PathLike,
    *,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 512,
    seed: int = 0,
    dtype: str = "float32",
    context: int = 512,
) -> Path:
    """Write a randomly initialised Llama model + tokenizer to ``path`` (safetensors).

    Deterministic for a given ``seed``. Returns ``path`` as a ``Path``.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab, seed)
    heads = max(2, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        # a multiple of 64: bitsandbytes 4-bit CPU kernels pack rows in blocks of 32
        intermediate_size=-(-hidden * 11 // 4 // 64) * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        do_sample=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


LORA_TARGETS = ("q_proj", "v_proj")  # peft's default for Llama


def build_lora_adapter(
    base_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    seed: int,
    r: int = 4,
    targets: tuple[str, ...] = LORA_TARGETS,
) -> Path:
    """Write a PEFT LoRA adapter for the model at ``base_path`` to ``out_path``.

    ``init_lora_weights=False`` makes both LoRA matrices random, so adapters built
    with different seeds change the model's output (a default adapter is a no-op).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_path))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    out = Path(out_path)
    peft_model.save_pretrained(out)
    return out


class Holder(persistent.Persistent):
    """Stands in for ``pLLM_obj``: any persistent object with a ``weights`` attribute."""


class TinyImage:
    """A real FileStorage image with a blob dir and ``root['pLLM_obj']``; can restart."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.blob_dir = self.directory / "blobs"
        self.open()

    def open(self) -> None:
        import transaction
        import ZODB
        import ZODB.FileStorage

        storage = ZODB.FileStorage.FileStorage(
            str(self.directory / "live_image.fs"), blob_dir=str(self.blob_dir)
        )
        self.db = ZODB.DB(storage)
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(transaction_manager=self.tm)
        if "pLLM_obj" not in self.conn.root():
            self.conn.root()["pLLM_obj"] = Holder()
            self.tm.commit()

    @property
    def library(self):
        from batos_uvm.weights import library_from_root

        return library_from_root(self.conn.root(), create=True)

    def restart(self) -> None:
        """Close and reopen, forgetting per-process state as a new process would."""
        from batos_uvm.weights import forget_verified

        self.close()
        forget_verified()
        self.open()

    def close(self) -> None:
        self.tm.abort()
        self.conn.close()
        self.db.close()


def greedy(model_dir: str | os.PathLike, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation with plain transformers (a reference for tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
