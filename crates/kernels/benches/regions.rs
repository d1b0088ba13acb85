//! What the parallel regions of a decode step cost on rayon's pool: the weight products of
//! Qwen2.5-Coder-0.5B's 24 layers (random weights in its file's block types, with the
//! activation quantization before each product) on two threads and on one, so the ratio is
//! how far two threads scale; and 121 regions of two 20 µs parts, 10 µs of serial work
//! apart, against the serial work alone, so what a region takes beyond its 20 µs is what
//! handing a part to the other thread costs (waking it, when it fell asleep in the gap).
//! A step runs on a worker of the pool, as `AdaptiveThreads` runs decode steps. The two
//! thread counts run in turn, step after step, and the ratio is taken pair by pair, so the
//! machine's drift cancels (a plain timing loop, not criterion, whose cases run one after
//! the other). On a machine shared with other work, run it at real-time priority
//! (`chrt -f 1`) to see what a quiet machine gives:
//!
//!     cargo bench -p kvmerger-kernels --bench regions

use std::time::{Duration, Instant};

use kvmerger_kernels::{QuantKind, QuantMatrix, QuantizedRows};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

const LAYERS: usize = 24;
const HIDDEN: usize = 896;
const FFN: usize = 4864;
/// q, k and v's rows together (896 + 128 + 128).
const QKV: usize = 1152;
/// A step's regions on Qwen2.5-Coder-0.5B: 5 a layer and the output projection.
const REGIONS: usize = 5 * LAYERS + 1;
/// Serial work between two regions, about a norm and a quantization.
const GAP: Duration = Duration::from_micros(10);
/// Each part of a region's work.
const PART: Duration = Duration::from_micros(20);
/// Steps of each kind, in turn.
const STEPS: usize = 60;

fn matrix(out_dim: usize, in_dim: usize, kind: QuantKind, rng: &mut StdRng) -> QuantMatrix {
    let values: Vec<f32> = (0..out_dim * in_dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let w = candle_core::Tensor::from_vec(values, (out_dim, in_dim), &candle_core::Device::Cpu)
        .expect("a matrix of its own size");
    QuantMatrix::quantize(&w, kind).expect("a supported block type")
}

/// One layer's products: q/k/v, output, gate and up, down.
#[derive(Clone)]
struct Layer {
    qkv: QuantMatrix,
    o: QuantMatrix,
    gate: QuantMatrix,
    up: QuantMatrix,
    down: QuantMatrix,
}

/// The buffers a step writes.
struct Buffers {
    acts: QuantizedRows,
    qkv: Vec<f32>,
    hidden: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

/// The products of one decode step of one row, each after its activation quantization.
fn products(layers: &[Layer], x: &[f32], b: &mut Buffers) {
    for l in layers {
        b.acts.quantize(x, 1);
        l.qkv.matmul(&b.acts, &mut b.qkv);
        b.acts.quantize(&b.qkv[..HIDDEN], 1);
        l.o.matmul(&b.acts, &mut b.hidden);
        b.acts.quantize(&b.hidden, 1);
        QuantMatrix::matmul_many(&[&l.gate, &l.up], &b.acts, &mut [&mut b.gate, &mut b.up]);
        b.acts.quantize(&b.gate, 1);
        l.down.matmul(&b.acts, &mut b.hidden);
    }
}

/// Busy work for `d`, as the serial parts between a step's regions.
fn serial(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// [`REGIONS`] gaps, each followed by a region of two [`PART`]s if `regions`.
fn empty_regions(regions: bool) {
    for _ in 0..REGIONS {
        serial(GAP);
        if regions {
            (0..2).into_par_iter().for_each(|_| serial(PART));
        }
    }
}

/// Milliseconds of `f` on a worker of `pool`.
fn time_on(pool: &rayon::ThreadPool, f: impl FnOnce() + Send) -> f64 {
    let start = Instant::now();
    pool.install(|| rayon::scope(|_| f()));
    start.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median, and the 10th and 90th percentiles.
fn spread(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    format!("{:.3} ({:.3} to {:.3})", v[n / 2], v[n / 10], v[n * 9 / 10])
}

fn main() {
    let mut rng = StdRng::seed_from_u64(9);
    let layer = Layer {
        qkv: matrix(QKV, HIDDEN, QuantKind::Q5_0, &mut rng),
        o: matrix(HIDDEN, HIDDEN, QuantKind::Q5_0, &mut rng),
        gate: matrix(FFN, HIDDEN, QuantKind::Q5_0, &mut rng),
        up: matrix(FFN, HIDDEN, QuantKind::Q5_0, &mut rng),
        down: matrix(HIDDEN, FFN, QuantKind::Q4K, &mut rng),
    };
    let layers = vec![layer; LAYERS];
    let bytes: usize = layers
        .iter()
        .map(|l| l.qkv.bytes() + l.o.bytes() + 2 * l.gate.bytes() + l.down.bytes())
        .sum();
    let x: Vec<f32> = (0..HIDDEN).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("a pool");
    let (two, one) = (pool(2), pool(1));
    let mut b = Buffers {
        acts: QuantizedRows::new(&x, 1),
        qkv: vec![0.0; QKV],
        hidden: vec![0.0; HIDDEN],
        gate: vec![0.0; FFN],
        up: vec![0.0; FFN],
    };
    let (mut on_two, mut on_one) = (Vec::new(), Vec::new());
    let (mut with_regions, mut gaps_only) = (Vec::new(), Vec::new());
    for _ in 0..STEPS {
        on_two.push(time_on(&two, || products(&layers, &x, &mut b)));
        on_one.push(time_on(&one, || products(&layers, &x, &mut b)));
        with_regions.push(time_on(&two, || empty_regions(true)));
        gaps_only.push(time_on(&two, || empty_regions(false)));
    }
    let ratios = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a / b).collect::<Vec<_>>();
    let gb_s = |ms: f64| bytes as f64 / ms / 1e6;
    let (ms_two, ms_one) = (median(on_two.clone()), median(on_one.clone()));
    println!("products of 24 layers, {:.1} MB of weights, {STEPS} steps each:", bytes as f64 / 1e6);
    println!(
        "  2 threads: {ms_two:.2} ms ({:.1} GB/s); 1 thread: {ms_one:.2} ms ({:.1} GB/s)",
        gb_s(ms_two),
        gb_s(ms_one)
    );
    println!("  1 thread / 2 threads, pair by pair: {}", spread(ratios(&on_one, &on_two)));
    let per_region: Vec<f64> =
        with_regions.iter().zip(&gaps_only).map(|(r, g)| (r - g) * 1e3 / REGIONS as f64).collect();
    println!(
        "{REGIONS} regions of 2 x {PART:?}, {GAP:?} apart, 2 threads: µs per region (20 if \
         the parts run side by side, 40 if one after the other), pair by pair: {}",
        spread(per_region)
    );
}
