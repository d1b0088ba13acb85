"""Writes a random-weight GGUF shaped like a real model, streaming its tensors to disk.

Usage: synthetic_gguf.py SHAPE OUT_FILE [--seed N]
SHAPE: `llama-8b` (Llama-3-8B: 32 layers, hidden 4096, 32 heads / 8 KV heads, FFN 14336,
vocabulary 128256; about 4.9 GB) or `tiny` (the same layout at a size a test can write).

The weights have the block types of a Q4_K_M file as llama.cpp's quantizer picks them: Q4_K
everywhere, Q6_K for the output matrix and for attn_v and ffn_down on the layers its
`use_more_bits` rule picks; norms in F32. Block contents are random bytes with fresh random
finite f16 scales sized so that products stay in range. Tensors are written a slice of rows
at a time: memory stays at a few tens of MB whatever the file's size.

The tokenizer is SentencePiece-style with byte fallback: 3 specials, the 256 byte tokens and
filler pieces up to the vocabulary size, so the loader accepts the file and any text encodes.
Prints one JSON line: the file's bytes and the tensor count.
Exits with status 3 when numpy or gguf is missing.
"""

import json
import sys

try:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as Q
except ImportError as e:  # the caller reports this
    print(f"missing Python package: {e}", file=sys.stderr)
    sys.exit(3)

SHAPES = {
    "llama-8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256,
                     context=8192, theta=500000.0),
    # Every in-dimension a multiple of the k-quant super-block (256).
    "tiny": dict(layers=8, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=512,
                 context=1024, theta=500000.0),
}

# Bytes per 256-value super-block and where its f16 scales sit.
BLOCK_BYTES = {Q.Q4_K: 144, Q.Q6_K: 210}
# Rows written at once are bounded by this many bytes.
SLICE_BYTES = 32 << 20


def use_more_bits(layer, layers):
    """llama.cpp's choice of layers whose attn_v and ffn_down a Q4_K_M file keeps in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensors(s):
    """(name, rows, cols, type, weight std) of every tensor, in file order; type None: F32."""
    h, kv = s["hidden"], s["kv_heads"] * (s["hidden"] // s["heads"])
    out = [("token_embd.weight", s["vocab"], h, Q.Q4_K, 0.02),
           ("output_norm.weight", 1, h, None, 0.0),
           ("output.weight", s["vocab"], h, Q.Q6_K, h ** -0.5)]
    for i in range(s["layers"]):
        more = Q.Q6_K if use_more_bits(i, s["layers"]) else Q.Q4_K
        out += [(f"blk.{i}.attn_norm.weight", 1, h, None, 0.0),
                (f"blk.{i}.attn_q.weight", h, h, Q.Q4_K, h ** -0.5),
                (f"blk.{i}.attn_k.weight", kv, h, Q.Q4_K, h ** -0.5),
                (f"blk.{i}.attn_v.weight", kv, h, more, h ** -0.5),
                (f"blk.{i}.attn_output.weight", h, h, Q.Q4_K, h ** -0.5),
                (f"blk.{i}.ffn_norm.weight", 1, h, None, 0.0),
                (f"blk.{i}.ffn_gate.weight", s["ffn"], h, Q.Q4_K, h ** -0.5),
                (f"blk.{i}.ffn_up.weight", s["ffn"], h, Q.Q4_K, h ** -0.5),
                (f"blk.{i}.ffn_down.weight", h, s["ffn"], more, s["ffn"] ** -0.5)]
    return out


def nbytes(rows, cols, qtype):
    return rows * cols * 4 if qtype is None else rows * cols // 256 * BLOCK_BYTES[qtype]


def random_blocks(rng, pool, blocks, qtype, std):
    """`blocks` super-blocks of `qtype`: random bytes, then random f16 scales giving values
    of about `std` (the random 6-bit or 8-bit sub-scales and quants set the rest)."""
    size = blocks * BLOCK_BYTES[qtype]
    start = int(rng.integers(0, len(pool) - size + 1))
    data = pool[start:start + size].copy().reshape(blocks, BLOCK_BYTES[qtype])
    scale = lambda mean: (rng.uniform(0.5, 1.5, blocks) * mean).astype(np.float16)
    f16_bytes = lambda v: v.view(np.uint8).reshape(blocks, 2)
    if qtype == Q.Q4_K:
        # d * sc * q - dmin * m with sc, m in 0..63 and q in 0..15: the std is about
        # 258 d; dmin = 7.5 d centres the values.
        d = std / 258.0
        data[:, 0:2] = f16_bytes(scale(d))
        data[:, 2:4] = f16_bytes(scale(7.5 * d))
    else:
        # d * sc * (q - 32) with sc in -128..127 and q in 0..63: the std is about 1365 d.
        data[:, 208:210] = f16_bytes(scale(std / 1365.0))
    return data


def write(shape, path, seed):
    s = SHAPES[shape]
    rng = np.random.default_rng(seed)
    head_dim = s["hidden"] // s["heads"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"synthetic {shape} (random weights)")
    w.add_context_length(s["context"])
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(s["theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    fillers = s["vocab"] - 3 - 256
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                     + [f"\u2581w{i}" for i in range(fillers)])
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(fillers)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * fillers)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    layout = tensors(s)
    for name, rows, cols, qtype, _ in layout:
        dims = (cols,) if rows == 1 else (rows, cols)
        dtype = Q.F32 if qtype is None else qtype
        w.add_tensor_info(name, dims, np.dtype(np.float32), nbytes(rows, cols, qtype), dtype)
    # The writer lays out the header and the tensor index; the data section follows,
    # each tensor at the offset the index gives (aligned, as the writer computed it).
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    align = w.data_alignment
    pool = np.frombuffer(rng.bytes(2 * SLICE_BYTES), dtype=np.uint8)
    with open(path, "ab") as f:
        f.write(b"\0" * (-f.tell() % align))
        for name, rows, cols, qtype, std in layout:
            if qtype is None:
                (1.0 + 0.1 * rng.standard_normal(cols)).astype(np.float32).tofile(f)
            else:
                row_blocks = cols // 256
                step = max(1, SLICE_BYTES // (row_blocks * BLOCK_BYTES[qtype]))
                for start in range(0, rows, step):
                    n = min(step, rows - start)
                    random_blocks(rng, pool, n * row_blocks, qtype, std).tofile(f)
            f.write(b"\0" * (-nbytes(rows, cols, qtype) % align))
        size = f.tell()
    print(json.dumps({"bytes": size, "tensors": len(layout)}))


def main():
    args = sys.argv[1:]
    seed = 0
    if "--seed" in args:
        i = args.index("--seed")
        seed = int(args[i + 1])
        del args[i:i + 2]
    if len(args) != 2 or args[0] not in SHAPES:
        print(f"usage: synthetic_gguf.py {{{','.join(SHAPES)}}} OUT_FILE [--seed N]", file=sys.stderr)
        sys.exit(2)
    write(args[0], args[1], seed)


if __name__ == "__main__":
    main()
