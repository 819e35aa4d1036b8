//! The `gram` command line: raw flags → validated options → library calls. Output is JSON on
//! stdout; errors go to stderr with a non-zero exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gram::lm;
use gram::tensor::DType;
use gram::{LoadOptions, Model, Tokenizer};
use serde_json::json;

#[derive(Parser)]
#[command(name = "gram", version, about = "GRAM generative retrieval engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Next-token log-probabilities (and an optional greedy continuation) for one prompt.
    Lm(LmArgs),
}

#[derive(clap::Args)]
struct LmArgs {
    /// Model directory: config.json, tokenizer.json, *.safetensors or one *.gguf.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text, tokenized as transformers' `tokenizer(text)` (special tokens added).
    #[arg(long)]
    prompt: String,
    /// How many of the most likely next tokens to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Also print the greedy continuation of this many tokens (stops at EOS).
    #[arg(long)]
    greedy: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Convert weights to this dtype at load: f32, f16 or bf16 (default: as stored; GGUF → f32).
    #[arg(long)]
    dtype: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lm(args) => run_lm(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_dtype(s: Option<&str>) -> Result<Option<DType>, String> {
    s.map(|s| DType::parse(s).ok_or_else(|| format!("--dtype `{s}`: expected f32, f16 or bf16")))
        .transpose()
}

fn run_lm(args: LmArgs) -> Result<(), String> {
    if !args.model.is_dir() {
        return Err(format!("--model {}: not a directory", args.model.display()));
    }
    if args.threads == Some(0) {
        return Err("--threads must be at least 1".into());
    }
    let options = LoadOptions {
        dtype: parse_dtype(args.dtype.as_deref())?,
        threads: args.threads,
    };
    let tokenizer =
        Tokenizer::from_file(&args.model.join("tokenizer.json")).map_err(|e| e.to_string())?;
    let model = Model::load(&args.model, &options).map_err(|e| e.to_string())?;
    let tokens = tokenizer.encode(&args.prompt).map_err(|e| e.to_string())?;
    let out = lm::run(&model, &tokens, args.greedy.unwrap_or(0)).map_err(|e| e.to_string())?;
    let mut obj = json!({
        "tokens": tokens,
        "top": lm::top_n(&out.logprobs, args.top),
    });
    if args.greedy.is_some() {
        obj["text"] = json!(tokenizer.decode(&out.greedy).map_err(|e| e.to_string())?);
        obj["greedy_tokens"] = json!(out.greedy);
    }
    println!("{obj}");
    Ok(())
}
