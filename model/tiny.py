"""`make_tiny`: a small, genuine Hugging Face checkpoint with random weights, for tests and demos.

What it writes into `out_dir` (no `transformers` import; `transformers` loads the result as is):

1. `config.json` in the v4 Hub style of the model type (`rope_theta`/`rope_scaling` at top level).
2. Random weights from `torch.Generator().manual_seed(seed)` under the Hub's tensor names, in
   `num_shards` files plus `model.safetensors.index.json` (or one `model.safetensors`).
3. `generation_config.json`, `tokenizer.json` (a byte-level BPE trained here on the small
   multilingual corpus below, then the Qwen3 special tokens) and `tokenizer_config.json` with
   the default chat template.

The same arguments always give byte-identical files.
"""
from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

MODEL_TYPES = ("qwen3_moe", "qwen3", "qwen2_moe", "mixtral")
ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BPE_VOCAB_SIZE = 1024
"""Byte alphabet (256) plus learned merges; the special tokens come after these ids."""
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Added tokens with special=True: dropped by decode(skip_special_tokens=True)."""
CONTROL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
"""Added tokens with special=False, as in Qwen3: never split, but kept by skip_special_tokens."""
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"

# Qwen2/Qwen3 pre-tokenizer: letters, single digits, punctuation runs, newlines, spaces. The same
# regex that transformers' Qwen2Tokenizer installs, so AutoTokenizer and `tokenizers` agree.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEMPLATE_PATH = Path(__file__).parent / "templates" / "qwen3.jinja"

# A few KB of original text to train the BPE on: prose, code, JSON, chat markup, several scripts.
CORPUS = """\
The small model was trained on nothing at all; its weights are random, but its shapes are real.
A mixture of experts sends every token to a few of many feed-forward networks. The router scores
each expert, keeps the best ones, and the layer adds their outputs weighted by those scores.
Serving such a model across many machines means moving tokens to the experts that own them and back.
When the request arrives, the gateway renders the chat template, counts the tokens, and waits.
Please summarize the following paragraph in two sentences, and keep the numbers exact.
The weather in Paris is mild today: 18 degrees, light wind from the west, no rain expected.
Numbers like 3.14159, 2048, 1e-6, 0x1F and 1,000,000 appear in logs, configs and questions.
Question: how many experts are active per token? Answer: eight of one hundred twenty-eight.
I think the answer is correct, but let me check the arithmetic once more before replying.
def route(scores, k):
    \"\"\"Return the indices and weights of the top-k experts for every token.\"\"\"
    weights, indices = torch.topk(scores.softmax(dim=-1), k, dim=-1)
    return indices, weights / weights.sum(dim=-1, keepdim=True)

class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        self.free = list(range(num_blocks))
        self.block_size = block_size

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"need {n} blocks, {len(self.free)} free")
        taken, self.free = self.free[:n], self.free[n:]
        return taken

for i in range(10):
    print(i, i * i, "even" if i % 2 == 0 else "odd")
import json, os, sys  # standard library only
x = {"a": [1, 2, 3], "b": None, "c": True}; y = x.get("a", [])[-1] + 40
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "description": "Search the web.",
 "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
{"id": "call_0", "role": "tool", "content": "{\\"temperature\\": 18, \\"condition\\": \\"sunny\\"}"}
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is the capital of France?<|im_end|>
<|im_start|>assistant
<think>
The user asks about France. Its capital is Paris.
</think>

The capital of France is Paris.<|im_end|>
<tool_call>
{"name": "get_time", "arguments": {"timezone": "Asia/Shanghai"}}
</tool_call>
<tool_response>
{"time": "09:30", "timezone": "Asia/Shanghai"}
</tool_response>
今天天气很好，我们去公园散步吧。这个模型很小，但是它的结构和真正的大模型一样。
专家混合模型把每个词元发送给少数几个专家网络，路由器为每个专家打分，然后选出最好的几个。
请用两句话总结下面这段文字，并保留所有的数字。北京是中国的首都，上海是最大的城市。
我想先检查一下计算结果，然后再回答你的问题。谢谢你的耐心！你好，世界！
الطقس جميل اليوم، لنذهب إلى الحديقة. هذا النموذج صغير، لكن بنيته مثل النماذج الكبيرة.
يرسل نموذج خليط الخبراء كل كلمة إلى عدد قليل من الشبكات، ويختار الموجّه أفضلها.
مرحبا بالعالم! كيف حالك اليوم؟ شكرا جزيلا على مساعدتك. القاهرة عاصمة مصر.
आज मौसम बहुत अच्छा है, चलो पार्क में टहलने चलते हैं। यह मॉडल छोटा है, लेकिन इसकी बनावट बड़े मॉडल जैसी है।
विशेषज्ञों का मिश्रण हर शब्द को कुछ ही नेटवर्क तक भेजता है, और राउटर सबसे अच्छे को चुनता है।
नमस्ते दुनिया! आप कैसे हैं? आपकी मदद के लिए बहुत धन्यवाद। दिल्ली भारत की राजधानी है।
Emoji travel well: 😀 😂 🎉 🚀 🌍 ❤️ 👍 🤖 🧠 ✨ 🔥 ✅ ❌ 🙏 👋🏽 👨‍👩‍👧 🇫🇷 🇨🇳 🇮🇳
Bonjour le monde ! Ça va très bien, merci. Größe, Straße, naïve café, señor, smörgåsbord.
Привет, мир! Как дела? Спасибо большое. こんにちは世界。안녕하세요 세계.
"""


def _train_tokenizer_json() -> str:
    """Train the byte-level BPE on `CORPUS` and add the Qwen3 special tokens (uncached; deterministic)."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.post_processor = None
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in CONTROL_TOKENS])
    return tokenizer.to_str(pretty=True)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """The tiny tokenizer's `tokenizer.json` text (trained once per process)."""
    return _train_tokenizer_json()


def default_chat_template() -> str:
    """The text of `templates/qwen3.jinja`, the Qwen3-format template used when a checkpoint has none."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def _tensor_table(model_type: str, d: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor, in generation order; init is "w", "bias" or "norm".

    D hidden, hd head dim, q/kv query/key width, E experts, F expert FFN (dense and shared FFN named so).
    """
    D, hd, q, kv = d["hidden"], d["head_dim"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    E, F, F_dense, F_shared = d["experts"], d["moe_ffn"], d["dense_ffn"], d["shared_ffn"]
    attention = [("q_proj.weight", (q, D), "w"), ("k_proj.weight", (kv, D), "w"),
                 ("v_proj.weight", (kv, D), "w"), ("o_proj.weight", (D, q), "w")]
    if model_type == "qwen2_moe":
        attention += [("q_proj.bias", (q,), "bias"), ("k_proj.bias", (kv,), "bias"),
                      ("v_proj.bias", (kv,), "bias")]
    if model_type in ("qwen3", "qwen3_moe"):
        attention += [("q_norm.weight", (hd,), "norm"), ("k_norm.weight", (hd,), "norm")]

    def swiglu(prefix: str, ffn: int, gate: str, up: str, down: str) -> list:
        return [(f"{prefix}.{gate}.weight", (ffn, D), "w"), (f"{prefix}.{up}.weight", (ffn, D), "w"),
                (f"{prefix}.{down}.weight", (D, ffn), "w")]

    if model_type == "qwen3":
        ffn = swiglu("mlp", F_dense, "gate_proj", "up_proj", "down_proj")
    elif model_type == "mixtral":
        ffn = [("block_sparse_moe.gate.weight", (E, D), "w")]
        for e in range(E):
            ffn += swiglu(f"block_sparse_moe.experts.{e}", F, "w1", "w3", "w2")
    else:
        ffn = [("mlp.gate.weight", (E, D), "w")]
        for e in range(E):
            ffn += swiglu(f"mlp.experts.{e}", F, "gate_proj", "up_proj", "down_proj")
        if model_type == "qwen2_moe":
            ffn += swiglu("mlp.shared_expert", F_shared, "gate_proj", "up_proj", "down_proj")
            ffn += [("mlp.shared_expert_gate.weight", (1, D), "w")]

    table = [("model.embed_tokens.weight", (d["vocab"], D), "w")]
    for layer in range(d["layers"]):
        p = f"model.layers.{layer}"
        table.append((f"{p}.input_layernorm.weight", (D,), "norm"))
        table += [(f"{p}.self_attn.{name}", shape, init) for name, shape, init in attention]
        table.append((f"{p}.post_attention_layernorm.weight", (D,), "norm"))
        table += [(f"{p}.{name}", shape, init) for name, shape, init in ffn]
    table.append(("model.norm.weight", (D,), "norm"))
    if not d["tie"]:
        table.append(("lm_head.weight", (d["vocab"], D), "w"))
    return table


def _random_tensors(table: list, seed: int, dtype: torch.dtype) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, shape, init in table:
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        x = 1.0 + 0.1 * x if init == "norm" else 0.02 * x
        tensors[name] = x.to(dtype).contiguous()
    return tensors


def _config(model_type: str, d: dict, *, top_k: int, max_position_embeddings: int, rope_scaling: dict | None,
            dtype: str, token_ids: dict) -> dict:
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": d["vocab"],
        "hidden_size": d["hidden"],
        "num_hidden_layers": d["layers"],
        "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"],
        "head_dim": d["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5 if model_type == "mixtral" else 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": d["tie"],
        "torch_dtype": dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
        "bos_token_id": token_ids[PAD_TOKEN],
        "eos_token_id": token_ids[EOS_TOKEN],
    }
    if model_type == "mixtral":
        config.update(intermediate_size=d["moe_ffn"], num_local_experts=d["experts"],
                      num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0,
                      output_router_logits=False, router_aux_loss_coef=0.02)
        return config
    config.update(intermediate_size=d["dense_ffn"], use_sliding_window=False, sliding_window=None,
                  max_window_layers=d["layers"])
    if model_type in ("qwen3", "qwen3_moe"):
        config["attention_bias"] = False
    if model_type in ("qwen3_moe", "qwen2_moe"):
        config.update(num_experts=d["experts"], num_experts_per_tok=top_k, moe_intermediate_size=d["moe_ffn"],
                      norm_topk_prob=model_type == "qwen3_moe", decoder_sparse_step=1, mlp_only_layers=[],
                      output_router_logits=False, router_aux_loss_coef=0.001)
    if model_type == "qwen2_moe":
        config.update(qkv_bias=True, shared_expert_intermediate_size=d["shared_ffn"])
    return config


def _tokenizer_config(token_ids: dict, model_max_length: int) -> dict:
    added = {}
    for token in SPECIAL_TOKENS + CONTROL_TOKENS:
        added[str(token_ids[token])] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": token in SPECIAL_TOKENS,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": default_chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_weights(out: Path, tensors: OrderedDict[str, torch.Tensor], num_shards: int) -> None:
    names = list(tensors)
    if num_shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    if num_shards > len(names):
        raise ValueError(f"num_shards={num_shards} exceeds the number of tensors ({len(names)})")
    weight_map = {}
    bounds = [round(i * len(names) / num_shards) for i in range(num_shards + 1)]
    for shard in range(num_shards):
        filename = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = OrderedDict((n, tensors[n]) for n in names[bounds[shard]:bounds[shard + 1]])
        save_file(part, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})


def make_tiny(
    out_dir: str | Path,
    *,
    model_type: str = "qwen3_moe",
    num_layers: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    moe_intermediate_size: int = 32,
    intermediate_size: int = 128,
    shared_expert_intermediate_size: int = 48,
    vocab_size: int | None = None,
    max_position_embeddings: int = 4096,
    rope_scaling: dict | None = None,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    num_shards: int = 2,
    fp8: str | None = None,
    fp8_block_size: int = 128,
) -> Path:
    """Write a random-weight HF checkpoint of `model_type` into `out_dir` and return its path.

    `vocab_size=None` uses the tokenizer's size rounded up to a multiple of 64. For mixtral the
    expert FFN width is `moe_intermediate_size` (written as Mixtral's `intermediate_size`);
    `intermediate_size` is the dense FFN of qwen3 and `shared_expert_intermediate_size` the
    shared expert of qwen2_moe.

    `fp8="fp8"` stores the linear layers' weights (attention projections, experts, dense FFNs) as
    Qwen's FP8 checkpoints do: float8 e4m3 with a float32 `weight_scale_inv` per block of
    `fp8_block_size` x `fp8_block_size`, and the `quantization_config` of that layout; embeddings,
    norms, router gates and lm_head stay in `dtype`. `fp8="compressed-tensors"` writes
    llm-compressor's FP8-Dynamic layout instead (a `weight_scale` per output channel). The
    random weights are the same as without `fp8` (the same seed), then quantized.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if fp8 not in FP8_LAYOUTS:
        raise ValueError(f"fp8 must be one of {FP8_LAYOUTS}, got {fp8!r}")
    if fp8_block_size < 1:
        raise ValueError(f"fp8_block_size must be >= 1, got {fp8_block_size}")

    tokenizer_json = tiny_tokenizer_json()
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is None:
        vocab_size = -(-tokenizer_size // 64) * 64
    elif vocab_size < tokenizer_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({tokenizer_size} tokens)")
    token_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + CONTROL_TOKENS}

    dims = {"vocab": vocab_size, "hidden": hidden_size, "layers": num_layers, "heads": num_heads,
            "kv_heads": num_kv_heads, "head_dim": head_dim, "experts": num_experts,
            "moe_ffn": moe_intermediate_size, "dense_ffn": intermediate_size,
            "shared_ffn": shared_expert_intermediate_size, "tie": tie_word_embeddings}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(model_type, dims, top_k=top_k, max_position_embeddings=max_position_embeddings,
                     rope_scaling=rope_scaling, dtype=dtype, token_ids=token_ids)
    if fp8 is not None:
        config["quantization_config"] = _fp8_config(fp8, fp8_block_size)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": token_ids[PAD_TOKEN],
        "eos_token_id": [token_ids[EOS_TOKEN], token_ids[PAD_TOKEN]],
        "pad_token_id": token_ids[PAD_TOKEN],
    })
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config(token_ids, max_position_embeddings))
    tensors = _random_tensors(_tensor_table(model_type, dims), seed, DTYPES[dtype])
    if fp8 is not None:
        tensors = _quantized(tensors, fp8, fp8_block_size)
    _write_weights(out, tensors, num_shards)
    return out


FP8_LAYOUTS = (None, "fp8", "compressed-tensors")
FP8_WEIGHTS = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
"""The linear layers an FP8 checkpoint quantizes (not embeddings, norms, router gates, lm_head)."""


def _fp8_config(layout: str, block: int) -> dict:
    if layout == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [block, block]}
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {**fp8, "strategy": "channel", "dynamic": False},
                "input_activations": {**fp8, "strategy": "token", "dynamic": True}}},
            "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*shared_expert_gate$"]}


def _quantized(tensors: OrderedDict[str, torch.Tensor], layout: str, block: int) -> OrderedDict[str, torch.Tensor]:
    from expertmesh.model.quantization import quantize_blocks, quantize_channels

    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in tensors.items():
        if not FP8_WEIGHTS.search(name):
            out[name] = tensor
        elif layout == "fp8":
            out[name], out[name[: -len("weight")] + "weight_scale_inv"] = quantize_blocks(tensor, (block, block))
        else:
            out[name], out[name[: -len("weight")] + "weight_scale"] = quantize_channels(tensor)
    return out
