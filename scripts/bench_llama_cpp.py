"""Prefill and decode speed of llama.cpp, through the llama-cpp-python package, on the token
ids `kvmerger bench` measures itself on. `kvmerger bench` runs this script when the package
is importable; by hand:

    pip install llama-cpp-python==0.3.36   # builds llama.cpp from source (minutes)
    python3 scripts/bench_llama_cpp.py < input.json

input.json: {"model": "file.gguf", "threads": 2, "lengths": [512, 2048],
             "steps": 16, "tokens": [token ids, at least max(lengths) + steps],
             optionally "type_k", "type_v" (ggml type ids: 8 q8_0, 2 q4_0) and
             "flash_attn" (needed for a quantized V cache)}
Prints one JSON object per length: prefill seconds and decode milliseconds per token.

Prefill is one `eval` of the prompt (llama.cpp splits it into batches of n_batch); each
decode step is a one-token `eval` of the next token of the input, so the timed work is the
forward pass alone, as in `kvmerger bench` (no sampling: `sample()` crashed in one build).
"""
import json
import sys
import time

from llama_cpp import Llama


def main():
    spec = json.load(sys.stdin)
    lengths, steps, tokens = spec["lengths"], spec["steps"], spec["tokens"]
    if len(tokens) < max(lengths) + steps:
        sys.exit(f"need {max(lengths) + steps} tokens, got {len(tokens)}")
    llm = Llama(
        model_path=spec["model"],
        n_ctx=max(lengths) + steps + 8,
        n_batch=512,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        verbose=False,
        **{k: spec[k] for k in ("type_k", "type_v", "flash_attn") if k in spec},
    )
    for n in lengths:
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens[:n])
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(steps):
            llm.eval([tokens[n + i]])
        decode = (time.perf_counter() - start) / steps
        print(json.dumps({"tokens": n, "prefill_s": prefill, "decode_s": decode}), flush=True)


if __name__ == "__main__":
    main()
