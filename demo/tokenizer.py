"""The demo model's tokenizer: a byte-level BPE trained on the corpus, with Qwen3's special tokens.

The pre-tokenizer is Qwen's (`model.tiny.SPLIT_PATTERN`): every digit is a token of its own, so
numbers are spelled digit by digit (the arithmetic and the copied tool arguments need that).
The special tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`) and the control tokens
(`<think>`, `<tool_call>`, ...) come after the learned merges, and `tokenizer_config.json` carries
the project's chat template, so our `Tokenizer` and transformers' `AutoTokenizer` load the folder
alike and the engine, the template and the parsers need no special case.

    python -m expertmesh.demo.tokenizer --out demo/tokenizer
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from expertmesh.demo.corpus import FAMILIES, examples, render
from expertmesh.demo.words import CITIES, NAMES, PHRASEBOOK
from expertmesh.model.tiny import CONTROL_TOKENS, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, SPLIT_PATTERN, _tokenizer_config
from expertmesh.model.tokenizer import Tokenizer as ChatTokenizer

VOCAB_SIZE = 4096
"""Byte alphabet plus merges; the 9 added tokens come after."""
TRAIN_EXAMPLES = 30000
MAX_POSITIONS = 4096
TOKENIZER_DIR = Path(__file__).parent / "tokenizer"


def _bootstrap_renderer() -> ChatTokenizer:
    """A Tokenizer whose only job is rendering chats with the project's template (no BPE yet)."""
    raw = Tokenizer(models.BPE())
    raw.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    from expertmesh.model.tiny import default_chat_template

    return ChatTokenizer(raw, chat_template=default_chat_template())


def training_text(n: int = TRAIN_EXAMPLES, seed: int = 0) -> list[str]:
    """Rendered chats of every family (the special tokens are added afterwards, so they are cut out)."""
    renderer = _bootstrap_renderer()
    texts = []
    for example in examples(n, "train-real", seed, FAMILIES):
        prompt, completion = render(renderer, example)
        texts.append(prompt + completion)
    # Cities and names are cut out: they are spelled with the pieces of other words, the same for
    # those in training and those held out, so copying a held-out city is the skill the model learnt.
    entities = re.compile(r"\b(" + "|".join(sorted(set(CITIES) | set(NAMES), key=len, reverse=True)) + r")\b")
    texts = [entities.sub(" ", t) for t in texts]
    # every phrasebook word at least a few times, whatever the sample drew
    texts += [" ".join(words) for words in PHRASEBOOK.values()] * 4
    return texts


def train_tokenizer(n: int = TRAIN_EXAMPLES, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    special = SPECIAL_TOKENS + CONTROL_TOKENS
    texts = training_text(n, seed)
    for token in special:  # the markup is added below as whole tokens; keep it out of the merges
        texts = [t.replace(token, "\n") for t in texts]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in CONTROL_TOKENS])
    return tokenizer


def write_tokenizer(out_dir: str | Path, tokenizer: Tokenizer) -> Path:
    """tokenizer.json, tokenizer_config.json (chat template included) and generation_config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + CONTROL_TOKENS}
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    for name, obj in (("tokenizer_config.json", _tokenizer_config(ids, MAX_POSITIONS)),
                      ("generation_config.json", generation_config(ids))):
        (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def generation_config(ids: dict[str, int | None]) -> dict:
    return {"bos_token_id": ids[PAD_TOKEN], "eos_token_id": [ids[EOS_TOKEN], ids[PAD_TOKEN]],
            "pad_token_id": ids[PAD_TOKEN]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m expertmesh.demo.tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(TOKENIZER_DIR), help="folder to write the tokenizer files into")
    parser.add_argument("--examples", type=int, default=TRAIN_EXAMPLES, help="corpus examples to train the BPE on")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="byte alphabet plus merges")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    args = parser.parse_args(argv)
    out = write_tokenizer(args.out, train_tokenizer(args.examples, args.vocab_size, args.seed))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
