#!/usr/bin/env python3
"""Token ids of texts under an independent rebuild of SmolLM2's tokenizer.

Reads the vocabulary and merges of a GGUF file with the `gguf` package and builds the
tokenizer with Hugging Face's `tokenizers` package, configured as SmolLM2's published
tokenizer.json is: byte-level BPE, pre-tokenizer Sequence[Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)], control tokens as special tokens.

Usage: tokenizer_crosscheck.py MODEL.gguf < texts.json
stdin holds a JSON list of strings; stdout gets a JSON list of id lists, one per text
(encoded without added BOS/EOS, as SmolLM2 adds none).

Needs: pip install gguf tokenizers
"""

import json
import sys

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

CONTROL = 3  # GGUF token type of control tokens such as <|im_start|>


def field(reader, key):
    value = reader.fields.get(key)
    if value is None:
        sys.exit(f"{key} is missing from the GGUF metadata")
    return value.contents()


def build(path):
    reader = gguf.GGUFReader(path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
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
