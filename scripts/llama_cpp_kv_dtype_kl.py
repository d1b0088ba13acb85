"""KL per token of llama.cpp's quantized KV caches against its f16 cache, on one text.

llama.cpp's own figure beside ours (docs/eval-kv-dtype/README.md): the model reads the first
`--tokens` tokens of the text once per cache type (flash attention on, which a quantized V
cache needs) and the next-token distributions of the second half are compared with the f16
cache's: mean and largest KL(f16 || quantized) in nats, and top-1 agreement.

    python3 scripts/llama_cpp_kv_dtype_kl.py MODEL.gguf TEXT.txt [--tokens 1024] [--offset 200000]
"""
import argparse

import llama_cpp
import numpy as np

GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}


def log_probs(model_path, tokens, cache_type, threads):
    model = llama_cpp.Llama(
        model_path=model_path,
        n_ctx=len(tokens) + 16,
        n_batch=512,
        logits_all=True,
        verbose=False,
        n_threads=threads,
        type_k=GGML_TYPES[cache_type],
        type_v=GGML_TYPES[cache_type],
        flash_attn=True,
    )
    model.eval(tokens)
    logits = np.array(model.scores[: len(tokens)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("text")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--offset", type=int, default=200_000, help="first character of the text read")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    text = open(args.text, encoding="utf-8").read()[args.offset : args.offset + 40 * args.tokens]
    tokenizer = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    tokens = tokenizer.tokenize(text.encode())[: args.tokens]
    reference = log_probs(args.model, tokens, "f16", args.threads)
    scored = slice(len(tokens) // 2, len(tokens))
    for cache_type in ("q8_0", "q4_0"):
        row = log_probs(args.model, tokens, cache_type, args.threads)
        kl = (np.exp(reference) * (reference - row)).sum(axis=1)[scored]
        top1 = (reference.argmax(axis=1) == row.argmax(axis=1))[scored].mean()
        print(f"{cache_type}: KL mean {kl.mean():.3e} max {kl.max():.3e} top-1 {top1:.3f} ({len(kl)} positions)")


if __name__ == "__main__":
    main()
