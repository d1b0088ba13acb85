"""Builds a tiny random-weight GGUF of each supported architecture and records
llama.cpp's logits on a fixed token sequence (llama-cpp-python, logits_all=True).

Usage: llama_cpp_architectures.py OUT_DIR
Each variant is written twice, with F16 and with Q8_0 weights (norms in F32):
OUT_DIR/<variant>-<dtype>.gguf, OUT_DIR/<variant>-<dtype>.logits (little-endian f32, one
row of `vocab` per token) and OUT_DIR/manifest.json listing them with their tokens.
Exits with status 3 when a package it needs is missing (the Rust test then skips).
"""

import json
import math
import os
import sys

try:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as Q
    from llama_cpp import Llama
except ImportError as e:  # the caller reports this and skips
    print(f"missing Python package: {e}", file=sys.stderr)
    sys.exit(3)

# A SentencePiece-style vocabulary: 3 specials, the 256 byte tokens llama.cpp looks up,
# and a few words. Token ids are fed directly, so the pieces only have to load.
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# Phi-3's vocabulary loader looks up its chat tokens by name.
CHAT = ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = [f"\u2581w{i}" for i in range(56)]
TOKENS = SPECIALS + BYTES + WORDS + CHAT
VOCAB = len(TOKENS)  # 320
SEQUENCE = [1] + [int(t) for t in np.random.default_rng(7).integers(3, VOCAB, 23)]

# Each variant: architecture, shapes and what sets it apart.
VARIANTS = {
    # Llama 3.x: RoPE divided by the file's per-frequency factors (`rope_freqs`), tied
    # output, GQA 4:1.
    "llama3": dict(arch="llama", hidden=64, heads=4, kv_heads=1, head_dim=16, inter=128,
                   layers=2, theta=500000.0, rope_freqs=True, tied=True),
    # Linear RoPE scaling read from `rope.scaling.type` / `rope.scaling.factor`.
    "llama-linear-rope": dict(arch="llama", hidden=64, heads=4, kv_heads=2, head_dim=16,
                              inter=128, layers=2, theta=10000.0, linear_rope=4.0),
    # Mistral: the llama architecture with its own window (longer than the sequence:
    # llama.cpp ignores the key for llama, so only a window it never reaches is comparable).
    "mistral": dict(arch="llama", hidden=64, heads=4, kv_heads=2, head_dim=16, inter=128,
                    layers=2, theta=1000000.0, window=64),
    "qwen2": dict(arch="qwen2", hidden=64, heads=4, kv_heads=2, head_dim=16, inter=128,
                  layers=2, theta=1000000.0, qkv_bias=True),
    # Qwen3: per-head q/k norms, head_dim (key_length) apart from hidden / heads.
    "qwen3": dict(arch="qwen3", hidden=64, heads=4, kv_heads=2, head_dim=32, inter=128,
                  layers=2, theta=1000000.0, qk_norm=True),
    # Gemma 3: scaled embeddings, q/k norms, post-norms, GELU, five window layers (window
    # 4, base 10000) and a global one (base 1e6), head_dim apart from hidden / heads.
    "gemma3": dict(arch="gemma3", hidden=64, heads=4, kv_heads=2, head_dim=32, inter=128,
                   layers=6, theta=1000000.0, qk_norm=True, post_norms=True, window=4,
                   tied=True),
    # Phi-3: fused qkv and gate/up projections.
    "phi3": dict(arch="phi3", hidden=64, heads=4, kv_heads=4, head_dim=16, inter=128,
                 layers=2, theta=10000.0, fused=True),
    # Phi-3 with LongRoPE: short factors (the context stays under the original length)
    # and the attention factor on cos/sin.
    "phi3-longrope": dict(arch="phi3", hidden=64, heads=4, kv_heads=4, head_dim=16,
                          inter=128, layers=2, theta=10000.0, fused=True, longrope=True),
}


def write_variant(path, name, v, dtype, rng):
    arch = v["arch"]
    hidden, heads, kv_heads, d, inter = v["hidden"], v["heads"], v["kv_heads"], v["head_dim"], v["inter"]
    quant = {"f16": Q.F16, "q8_0": Q.Q8_0}[dtype]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_block_count(v["layers"])
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(d)
    w.add_value_length(d)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(v["theta"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == Q.Q8_0 else gguf.LlamaFileType.MOSTLY_F16)
    if "window" in v:
        w.add_sliding_window(v["window"])
    if "linear_rope" in v:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(v["linear_rope"])
    if v.get("longrope"):
        w.add_rope_scaling_attn_factors(1.19)
        w.add_rope_scaling_orig_ctx_len(4096)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(WORDS))] + [0.0] * len(CHAT))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(WORDS) + [3] * len(CHAT))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def weight(tname, rows, cols, std):
        matrix(tname, (rng.standard_normal((rows, cols)) * std).astype(np.float32))

    def matrix(tname, data):
        if quant == Q.F16:
            w.add_tensor(tname, data.astype(np.float16))
        else:
            w.add_tensor(tname, gguf.quants.quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)

    def vector(tname, n, mean=1.0, std=0.2):
        w.add_tensor(tname, (mean + rng.standard_normal(n) * std).astype(np.float32))

    weight("token_embd.weight", VOCAB, hidden, 0.4)
    vector("output_norm.weight", hidden)
    if not v.get("tied"):
        weight("output.weight", VOCAB, hidden, 0.4)
    half = d // 2
    if v.get("rope_freqs"):
        w.add_tensor("rope_freqs.weight", np.exp(rng.uniform(-1.5, 1.5, half)).astype(np.float32))
    if v.get("longrope"):
        w.add_tensor("rope_factors_short.weight", np.exp(rng.uniform(-1.0, 1.0, half)).astype(np.float32))
        w.add_tensor("rope_factors_long.weight", np.exp(rng.uniform(1.0, 3.0, half)).astype(np.float32))
    q_dim, kv_dim = heads * d, kv_heads * d
    # Large query/key weights make attention peaked, so position and mask errors show.
    qk_std, std = 1.5 / math.sqrt(hidden), 1.0 / math.sqrt(hidden)
    for l in range(v["layers"]):
        b = f"blk.{l}."
        vector(b + "attn_norm.weight", hidden)
        vector(b + "ffn_norm.weight", hidden)
        if v.get("fused"):
            qkv = np.concatenate([
                rng.standard_normal((q_dim, hidden)) * qk_std,
                rng.standard_normal((kv_dim, hidden)) * qk_std,
                rng.standard_normal((kv_dim, hidden)) * std,
            ]).astype(np.float32)
            matrix(b + "attn_qkv.weight", qkv)
            weight(b + "ffn_up.weight", 2 * inter, hidden, std)
        else:
            weight(b + "attn_q.weight", q_dim, hidden, qk_std)
            weight(b + "attn_k.weight", kv_dim, hidden, qk_std)
            weight(b + "attn_v.weight", kv_dim, hidden, std)
            weight(b + "ffn_gate.weight", inter, hidden, std)
            weight(b + "ffn_up.weight", inter, hidden, std)
        weight(b + "attn_output.weight", hidden, q_dim, 1.0 / math.sqrt(q_dim))
        weight(b + "ffn_down.weight", hidden, inter, 1.0 / math.sqrt(inter))
        if v.get("qkv_bias"):
            vector(b + "attn_q.bias", q_dim, 0.0, 0.5)
            vector(b + "attn_k.bias", kv_dim, 0.0, 0.5)
            vector(b + "attn_v.bias", kv_dim, 0.0, 0.5)
        if v.get("qk_norm"):
            vector(b + "attn_q_norm.weight", d)
            vector(b + "attn_k_norm.weight", d)
        if v.get("post_norms"):
            vector(b + "post_attention_norm.weight", hidden)
            vector(b + "post_ffw_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits(path):
    llm = Llama(model_path=path, n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
                verbose=False)
    llm.eval(SEQUENCE)
    logits = np.array(llm.scores[: len(SEQUENCE)], dtype=np.float32)
    llm.close()
    return logits


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(2025)
    manifest = []
    for name, v in VARIANTS.items():
        for dtype in ["f16", "q8_0"]:
            file = f"{name}-{dtype}"
            path = os.path.join(out, f"{file}.gguf")
            write_variant(path, name, v, dtype, rng)
            logits = llama_cpp_logits(path)
            logits.astype("<f4").tofile(os.path.join(out, f"{file}.logits"))
            manifest.append(dict(name=name, file=file, dtype=dtype, arch=v["arch"],
                                 tokens=SEQUENCE, vocab=VOCAB))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
