"""Prefill and decode speed of llama.cpp (through the llama-cpp-python package) on a GGUF
file, for the same lengths `kvmerger bench` measures. Prints one JSON object per length.

    pip install llama-cpp-python   # builds llama.cpp from source
    python3 scripts/bench_llama_cpp.py MODEL.gguf 512 2048 4080
"""
import json
import sys
import time

from llama_cpp import Llama


def main():
    path, lengths = sys.argv[1], [int(x) for x in sys.argv[2:]] or [512, 2048, 4080]
    steps = 16
    llm = Llama(model_path=path, n_ctx=max(lengths) + steps + 8, n_batch=512, n_threads=2, verbose=False)
    text = "The quick brown fox jumps over the lazy dog while the river runs past the old mill. " * 800
    all_tokens = llm.tokenize(text.encode(), add_bos=False)
    for n in lengths:
        llm.reset()
        tokens = all_tokens[:n]
        start = time.perf_counter()
        llm.eval(tokens)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            llm.eval([llm.sample(temp=0.0)])
        decode = (time.perf_counter() - start) / steps
        print(json.dumps({"engine": "llama.cpp", "tokens": n, "prefill_s": prefill,
                          "prefill_tok_s": n / prefill, "decode_ms_per_token": decode * 1e3}), flush=True)


if __name__ == "__main__":
    main()
