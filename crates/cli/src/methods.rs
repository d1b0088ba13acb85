//! `kvmerger methods`: every method with its parameters and their defaults, read from the
//! method table and the parameter structs' own defaults (nothing listed by hand).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kvmerger_compress::{Budget, CompressionConfig, METHODS};
use serde_json::{json, Value};

#[derive(Debug, Args)]
pub struct MethodsArgs {
    /// Also write the list as JSON here.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(args: MethodsArgs) -> Result<()> {
    let mut listing = Vec::new();
    for info in METHODS {
        let params = CompressionConfig::from_cli(info.name, None, &[])?.parameters();
        listing.push(json!({
            "name": info.name,
            "aliases": info.aliases,
            "summary": info.summary,
            "parameters": params,
        }));
    }
    let mut out = std::io::stdout().lock();
    for (info, entry) in METHODS.iter().zip(&listing) {
        let aliases = match info.aliases {
            [] => String::new(),
            a => format!(" (also {})", a.join(", ")),
        };
        writeln!(out, "{}{aliases}: {}", info.name, info.summary)?;
        for (name, value) in entry["parameters"].as_object().into_iter().flatten() {
            writeln!(out, "    {name} = {}", shown(name, value)?)?;
        }
    }
    writeln!(
        out,
        "\nSet a parameter with -P name=value (e.g. -P sigma=adaptive, -P budget=35%, \
         -P scorer=keydiff); null means the method chooses (KVMerger: by budget; AdaKV's \
         head_method: the scorer itself). A wrapped method (scorer, head_method) is a name, \
         or a JSON object for other parameters: -P 'scorer={{\"method\":\"snapkv\",\"window\":64}}'. \
         A parameter the chosen mode does not read (threshold in KVMerger's default merge \
         mode) is an error."
    )?;
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&listing)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A default as `-P` would take it: budgets in their grammar (`50%`), other floats at the
/// precision they are stored in (most parameters are `f32`), strings bare.
fn shown(name: &str, value: &Value) -> Result<String> {
    Ok(match value {
        _ if name == "budget" => serde_json::from_value::<Budget>(value.clone())?.to_string(),
        Value::Number(n) if n.is_f64() => (n.as_f64().unwrap_or_default() as f32).to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}
