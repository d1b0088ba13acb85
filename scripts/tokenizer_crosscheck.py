#!/usr/bin/env python3
"""Token ids of texts under an independent rebuild of a GGUF file's byte-level BPE tokenizer.

Reads the vocabulary and merges of a GGUF file with the `gguf` package and builds the
tokenizer with Hugging Face's `tokenizers` package, configured as the model's published
tokenizer.json is, chosen by `tokenizer.ggml.pre`:
- smollm (SmolLM2): Sequence[Digits(individual_digits=True),
  ByteLevel(add_prefix_space=False, use_regex=True)];
- qwen2 (Qwen2.5): Sequence[Split(Qwen2's regex, isolated), ByteLevel(add_prefix_space=False,
  use_regex=False)].
Control tokens become special tokens.

Usage: tokenizer_crosscheck.py MODEL.gguf < texts.json
stdin holds a JSON list of strings; stdout gets a JSON list of id lists, one per text
(encoded without added BOS/EOS, as SmolLM2 adds none).

Needs: pip install gguf tokenizers
"""

import json
import sys

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

CONTROL = 3  # GGUF token type of control tokens such as <|im_start|>


def field(reader, key):
    value = reader.fields.get(key)
    if value is None:
        sys.exit(f"{key} is missing from the GGUF metadata")
    return value.contents()


# The pattern of Qwen2.5's published tokenizer.json.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer(pre):
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    if pre == "qwen2":
        split = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    sys.exit(f"no independent rebuild for tokenizer.ggml.pre = {pre}")


def build(path):
    reader = gguf.GGUFReader(path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizer(field(reader, "tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    return tokenizer


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    tokenizer = build(sys.argv[1])
    texts = json.load(sys.stdin)
    json.dump([tokenizer.encode(t, add_special_tokens=False).ids for t in texts], sys.stdout)


if __name__ == "__main__":
    main()
