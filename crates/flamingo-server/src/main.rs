//! The `flamingo` command.
//!
//! - `flamingo serve [...]` (also what `flamingo` with no subcommand does): the OpenAI-compatible
//!   HTTP server.
//! - `flamingo generate --model DIR --image PATH [--image PATH ...] --prompt TEXT [...]` runs one
//!   interleaved image/text prompt through a Flamingo-family model and prints the continuation
//!   (through the engine, as the server runs requests).
//! - `flamingo download NAME`: fetches a released checkpoint into the HF cache.
//! - `flamingo bench`: engine measurements on a random model.
//! - `flamingo shapes --out DIR`: examples of the shapes world the default model knows.
//! - `flamingo eval [--model DIR] [--n N] [--seed S] [--json] [--mode generate|classify|rices]`:
//!   the shapes world's held-out evaluation set through the server's chat path, scored per row;
//!   `classify` also ranks each task's answers by log-likelihood (`/v1/score`), `rices` compares
//!   retrieved (RICES) with random demonstrations.
//! - `flamingo parity --fixtures DIR [--device D] [--dtype T]`: the reference-parity fixtures'
//!   ids and logits on any device.

mod bench;
mod eval;
mod generate;
mod parity;
mod shapes;

/// mimalloc keeps freed pages for reuse: with the system allocator, the large per-step
/// activations were returned to the kernel and faulted back in zeroed (7% of a decode step).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in mimalloc 3's `mi_option_e`; the crate
/// does not export the constant; `purge_delay_option_is_where_we_think` checks it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory is kept for reuse instead of being returned to the OS (mimalloc's
/// `purge_delay = -1`): a decode step frees and re-allocates the same large buffers every
/// ~100 ms, and with mimalloc's default (purge after 1 s) some were returned and faulted back in
/// zeroed, ~220 page faults per 16-sequence step and 10% of its throughput; a 10 s delay still
/// left ~60. The process keeps its peak footprint, which the engine's budgets bound, as
/// inference servers that preallocate do. `MIMALLOC_PURGE_DELAY` (milliseconds) in the
/// environment wins, e.g. `MIMALLOC_PURGE_DELAY=1000` to return memory as before.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an allocator option is thread-safe in mimalloc and takes a plain value.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "flamingo", version, about = "Serve and run Flamingo-family visual language models")]
struct Cli {
    /// Without a subcommand: `serve` with its defaults.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API (the default).
    Serve(ServeArgs),
    /// Download a released checkpoint (a name from config/models/) into the HF cache and print
    /// its model directory.
    Download(DownloadArgs),
    /// Continue one interleaved image/text prompt.
    Generate(generate::GenerateArgs),
    /// Measure the engine (batching, caches) on a random model of a real shape.
    Bench(bench::BenchArgs),
    /// Write examples of the shapes world (the default model's training and evaluation data).
    Shapes(shapes::ShapesArgs),
    /// Score a model on the shapes world's held-out evaluation set, through the server's chat
    /// path.
    Eval(eval::EvalArgs),
    /// Check greedy and beam ids and logits against the PyTorch reference's fixtures on a
    /// device and dtype (what the tests check on the CPU, for hosts without Rust, e.g. a GPU).
    Parity(parity::ParityArgs),
}

#[derive(Args, Default)]
struct ServeArgs {
    /// Model directory, or a released checkpoint's name (e.g.
    /// openflamingo/OpenFlamingo-3B-vitl-mpt1b, downloaded to the HF cache). Default:
    /// flamingo-mini, the model embedded in the binary.
    #[arg(long)]
    model: Option<String>,
    /// Address to listen on (default 127.0.0.1).
    #[arg(long)]
    host: Option<String>,
    /// Port (default 8000; 0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Configuration file (TOML; keys as in config/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Accepted API key (repeatable); clients send `Authorization: Bearer <key>`.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// The model id clients use.
    #[arg(long)]
    served_model_name: Option<String>,
    /// text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// f32, f16 or bf16.
    #[arg(long)]
    dtype: Option<String>,
    /// Where registered demonstration sets are stored (default: $XDG_DATA_HOME/flamingo, else
    /// ~/.local/share/flamingo). Replicas may share it.
    #[arg(long)]
    data_dir: Option<String>,
    /// Linear-layer weights on the CPU: none, f16 (half the bytes, computed in f32), q8_0 (8-bit blocks, the output head in f16) or q8_0_head (the head in 8 bits too).
    #[arg(long)]
    quantize: Option<String>,
}

#[derive(Args)]
struct DownloadArgs {
    /// A name from config/models/, e.g. openflamingo/OpenFlamingo-3B-vitl-mpt1b.
    name: String,
}

fn init_logs(format: &str, default_level: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        b.json().flatten_event(true).with_current_span(true).with_span_list(false).init();
    } else {
        b.init();
    }
    // A panic (a bug) is logged as an error event in the chosen format, with where it
    // happened; the request or engine step it interrupted reports it (a 500) and the server
    // goes on.
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!(panic = %flamingo_engine::panic_message(info.payload()), %location, "panic");
    }));
}

fn run_serve(a: ServeArgs) -> Result<()> {
    use flamingo_server::config::{Config, Overrides};
    let flags = Overrides {
        host: a.host,
        port: a.port,
        model: a.model,
        api_keys: a.api_keys,
        served_model_name: a.served_model_name,
        log_format: a.log_format,
        device: a.device,
        dtype: a.dtype,
        data_dir: a.data_dir,
        quantize: a.quantize,
    };
    let cfg = Config::load(a.config.as_deref(), &|k| std::env::var(k).ok(), &flags)?;
    init_logs(&cfg.server.log_format, "info");
    let source = flamingo_server::server::ModelSource::from_config(&cfg.model.path);
    // The blocking pool (image decoding, store I/O) is capped at twice the cores, and its
    // threads are kept: each thread has an allocator heap of its own, and a pool that grew a
    // thread per concurrent request (tokio's default allows 512) held 490 MiB after a 2-minute
    // soak of 16 clients against flamingo-mini, and was still growing, where 4 threads plateau
    // at 240 MiB with the same throughput (BENCHMARKS.md). At least 4: the model loader holds
    // one while it waits for the stored demonstration sets it restores.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads((2 * cores).max(4))
        .thread_keep_alive(std::time::Duration::from_secs(60))
        .build()?;
    rt.block_on(async move {
        let handle = flamingo_server::server::serve(cfg, source, true).await?;
        handle.wait().await
    })
}

fn run_download(a: DownloadArgs) -> Result<()> {
    let opts = flamingo_server::hub::HubOptions::from_env();
    let dir = flamingo_server::hub::resolve(&a.name, &opts)?;
    println!("{}", dir.display());
    Ok(())
}

/// Fixes the CPU thread count for the whole process, once, before any other thread starts.
///
/// Without `RAYON_NUM_THREADS`, candle works out its thread count (physical cores, from
/// `/proc/cpuinfo` on Linux) on every matmul and every parallel element-wise op: about 60 µs a
/// call on this project's machine, hundreds of calls per decode step. Setting the variable to
/// that same count makes the lookup free; an operator's own setting is kept.
fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = flamingo_model::candle::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn main() {
    pin_cpu_threads();
    keep_freed_memory();
    let cli = Cli::parse();
    if !matches!(cli.command, None | Some(Command::Serve(_))) {
        init_logs("text", "warn");
    }
    let res = match cli.command {
        None => run_serve(ServeArgs::default()),
        Some(Command::Serve(a)) => run_serve(a),
        Some(Command::Download(a)) => run_download(a),
        Some(Command::Generate(a)) => generate::run(a),
        Some(Command::Bench(a)) => bench::run(a),
        Some(Command::Shapes(a)) => shapes::run(a),
        Some(Command::Eval(a)) => eval::run(a),
        Some(Command::Parity(a)) => parity::run(a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    /// The option index used by `keep_freed_memory` is mimalloc's purge delay: its documented
    /// default (1000 ms in mimalloc 3) is what that index reads before anyone sets it.
    #[test]
    fn purge_delay_option_is_where_we_think() {
        // SAFETY: reading an allocator option.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, 1000, "mimalloc option {} is not purge_delay (value {v})", super::MI_OPTION_PURGE_DELAY);
    }
}
