use candle_core::Device;
use kvmerger_engine::testing::kl_divergence;
use kvmerger_engine::{load_gguf, ForwardOptions, Logits, WeightFormats};
#[test]
fn real() {
    let path = std::env::var("ZZ_MODEL").unwrap();
    let refp = std::env::var("ZZ_REF").unwrap();
    let toks: Vec<u32> =
        serde_json::from_str(&std::fs::read_to_string(format!("{refp}.json")).unwrap()).unwrap();
    let npy = std::fs::read(format!("{refp}.npy")).unwrap();
    let hl = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let flat: Vec<f32> =
        npy[10 + hl..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let n = toks.len();
    let vocab = flat.len() / n;
    let (m, _) =
        load_gguf(std::path::Path::new(&path), WeightFormats::default(), &Device::Cpu).unwrap();
    let mut c = m.new_cache();
    let o = ForwardOptions { logits: Logits::All, ..Default::default() };
    let ours = m.forward(&toks, &mut c, o).unwrap().to_vec2::<f32>().unwrap();
    let (mut kl, mut mx, mut agree, mut nll) = (0.0, 0.0f64, 0, 0.0);
    for i in 0..n {
        let t = &flat[i * vocab..(i + 1) * vocab];
        let k = kl_divergence(t, &ours[i][..vocab]);
        kl += k;
        mx = mx.max(k);
        agree +=
            usize::from(kvmerger_engine::argmax(t) == kvmerger_engine::argmax(&ours[i][..vocab]));
        if i + 1 < n {
            let r = &ours[i];
            let max = r.iter().copied().fold(f32::MIN, f32::max) as f64;
            let lse = r.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            nll += lse - r[toks[i + 1] as usize] as f64;
        }
    }
    eprintln!(
        "mean KL {:.4} max {:.4} top1 {:.3} ours ppl {:.3}",
        kl / n as f64,
        mx,
        agree as f64 / n as f64,
        (nll / (n - 1) as f64).exp()
    );
}
