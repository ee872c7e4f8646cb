"""Write a GGUF file from a small transformers Llama model folder, for llama.cpp tests.

llama.cpp's own converter refuses locally trained BPE tokenizers, so this writes the
file directly with PyPI ``gguf``: llama architecture, tensors renamed to llama.cpp
names (Q/K rows permuted for llama.cpp's rotary layout), float32 weights, and the
byte-level BPE vocabulary and merges as a ``gpt2`` tokenizer with the ``gpt-2``
pre-tokenizer. With these, llama.cpp's greedy output matches transformers'.

    write_gguf(model_dir, out_path, chat_template=True) -> Path
    (chat_template: True copies the model's template, False writes none, a str is used as is)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # transformers rotates halves of each head; llama.cpp rotates interleaved pairs.
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _load_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        for name, t in load_file(str(shard)).items():
            tensors[name] = t.float().numpy()
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return tensors


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    cfg = model_dir / "tokenizer_config.json"
    template = json.loads(cfg.read_text()).get("chat_template") if cfg.exists() else None
    return template if isinstance(template, str) else None


def _add_tokenizer(w: gguf.GGUFWriter, model_dir: Path, n_vocab: int, cfg: dict) -> None:
    from tokenizers import Tokenizer

    data = json.loads((model_dir / "tokenizer.json").read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers are supported, not {model.get('type')}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, idx in model["vocab"].items():
        tokens[idx], types[idx] = text, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        special = added.get("special", False)
        types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, as tokenizers' ByteLevel uses
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("pad_token_id", w.add_pad_token_id),
    ):
        if isinstance(cfg.get(key), int):
            add(cfg[key])
    # Add BOS/EOS only if the tokenizer itself does, so both see the same ids.
    probe = Tokenizer.from_str(json.dumps(data)).encode("a", add_special_tokens=True).ids
    w.add_add_bos_token(bool(probe) and probe[0] == cfg.get("bos_token_id"))
    w.add_add_eos_token(bool(probe) and probe[-1] == cfg.get("eos_token_id"))


def write_gguf(
    model_dir: str | os.PathLike, out_path: str | os.PathLike, *, chat_template: bool | str = True
) -> Path:
    """Convert the Llama model in ``model_dir`` to a float32 GGUF at ``out_path``."""
    model_dir, out = Path(model_dir), Path(out_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"only llama models are supported, not {cfg.get('model_type')}")
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(float(rope_theta))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(w, model_dir, cfg["vocab_size"], cfg)
    if isinstance(chat_template, str):
        template: str | None = chat_template
    else:
        template = _chat_template(model_dir) if chat_template else None
    if template:
        w.add_chat_template(template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    for name, data in _load_tensors(model_dir).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"no llama.cpp name for tensor {name}")
        if name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, n_head_kv)
        w.add_tensor(new_name, np.ascontiguousarray(data, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
