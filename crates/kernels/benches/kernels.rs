//! Decode-path matrix products on SmolLM2-135M's shapes: candle's quantized matmul (Q8_0, and
//! Q4_1 as the file stores it) against our kernel (`QuantMatrix`, Q4_1 and Q8_0), for 1, 4
//! and 8 activation rows. Each case cycles through enough copies of the matrix to exceed the
//! last-level cache, as a decode step does (every weight is read once per step).
//!
//!
//! Then Qwen2.5-Coder-0.5B's shapes in the block types GGUF files store (Q5_0 and Q8_0 where
//! the width is not a multiple of 256, the k-quants where it is): 1 and 8 rows on the block
//! kernels (decode), 512 rows on the dense path (prefill: dequantized tiles, f32 GEMM)
//! against candle's f32 product of the same rows, and Q8_0 (what every type was requantized to
//! before the kernels read the file's own blocks) on the same shapes.
//!
//!     cargo bench -p kvmerger-kernels --bench kernels
//!     cargo bench -p kvmerger-kernels --bench kernels -- '1536x576' --warm-up-time 1 --measurement-time 2
//!     cargo bench -p kvmerger-kernels --bench kernels -- 'file 896x4864'
//!     cargo bench -p kvmerger-kernels --bench kernels -- 'activation quantization'

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use kvmerger_kernels::{QuantKind, QuantMatrix, QuantizedRows};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Bytes of weights each case cycles through (the last-level cache is 32 MiB here).
const WORKING_SET: usize = 96 << 20;

/// `(out, in)`: q/o, k/v, gate/up, down, lm_head.
const SHAPES: [(usize, usize); 5] =
    [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)];

fn random(n: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(3);
    for (out_dim, in_dim) in SHAPES {
        let w =
            Tensor::from_vec(random(out_dim * in_dim, &mut rng), (out_dim, in_dim), &Device::Cpu)
                .unwrap();
        let copies = (WORKING_SET / (out_dim * in_dim)).clamp(1, 64);
        let candle = |dtype| {
            let q = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
            vec![QMatMul::QTensor(q); copies]
        };
        let ours = |kind| vec![QuantMatrix::quantize(&w, kind).unwrap(); copies];
        let (candle_q8, candle_q4_1) = (candle(GgmlDType::Q8_0), candle(GgmlDType::Q4_1));
        let (ours_q4_1, ours_q8) = (ours(QuantKind::Q4_1), ours(QuantKind::Q8_0));
        let mut group = c.benchmark_group(format!("{out_dim}x{in_dim}"));
        for rows in [1usize, 4, 8] {
            let x = random(rows * in_dim, &mut rng);
            let xt = Tensor::from_vec(x.clone(), (rows, in_dim), &Device::Cpu).unwrap();
            for (name, mats) in [("candle q8_0", &candle_q8), ("candle q4_1", &candle_q4_1)] {
                if name == "candle q4_1" && out_dim == 49152 {
                    continue; // scalar and slow: the smaller shapes tell the story
                }
                let mut i = 0;
                group.bench_function(format!("{name} rows {rows}"), |b| {
                    b.iter(|| {
                        i = (i + 1) % copies;
                        mats[i].forward(&xt).unwrap()
                    })
                });
            }
            for (name, mats) in [("ours q4_1", &ours_q4_1), ("ours q8_0", &ours_q8)] {
                let mut out = vec![0.0f32; rows * out_dim];
                let mut i = 0;
                group.bench_function(format!("{name} rows {rows}"), |b| {
                    b.iter(|| {
                        i = (i + 1) % copies;
                        // Quantizing the activations is part of each product's cost.
                        let q = QuantizedRows::new(&x, rows);
                        mats[i].matmul(&q, &mut out);
                    })
                });
            }
        }
        group.finish();
    }
}

fn file_blocks(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(5);
    let shapes: [(usize, usize, &[QuantKind]); 3] = [
        (896, 896, &[QuantKind::Q5_0, QuantKind::Q8_0, QuantKind::Q4_0]),
        (4864, 896, &[QuantKind::Q5_0, QuantKind::Q8_0]),
        (896, 4864, &[QuantKind::Q4K, QuantKind::Q5K, QuantKind::Q6K, QuantKind::Q8_0]),
    ];
    for (out_dim, in_dim, kinds) in shapes {
        let w =
            Tensor::from_vec(random(out_dim * in_dim, &mut rng), (out_dim, in_dim), &Device::Cpu)
                .unwrap();
        let copies = (WORKING_SET / (out_dim * in_dim)).clamp(1, 64);
        let mut group = c.benchmark_group(format!("file {out_dim}x{in_dim}"));
        for &kind in kinds {
            let mats = vec![QuantMatrix::quantize(&w, kind).unwrap(); copies];
            for rows in [1usize, 8, 512] {
                let x = random(rows * in_dim, &mut rng);
                let mut out = vec![0.0f32; rows * out_dim];
                let mut i = 0;
                group.bench_function(format!("ours {kind:?} rows {rows}"), |b| {
                    b.iter(|| {
                        i = (i + 1) % copies;
                        let q = QuantizedRows::new(&x, rows);
                        mats[i].matmul(&q, &mut out);
                    })
                });
            }
        }
        let xt =
            Tensor::from_vec(random(512 * in_dim, &mut rng), (512, in_dim), &Device::Cpu).unwrap();
        let wt = w.t().unwrap();
        group.bench_function("candle f32 rows 512", |b| b.iter(|| xt.matmul(&wt).unwrap()));
        group.finish();
    }
}

/// The activation quantization before each decode product, on Qwen2.5-Coder-0.5B's widths
/// (compare levels with `KVMERGER_KERNEL_LEVEL=portable`).
fn quantization(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut group = c.benchmark_group("activation quantization");
    for width in [896usize, 4864] {
        let x = random(width, &mut rng);
        let mut q = QuantizedRows::new(&x, 1);
        group.bench_function(format!("1 row of {width}"), |b| b.iter(|| q.quantize(&x, 1)));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench, file_blocks, quantization
}
criterion_main!(benches);
