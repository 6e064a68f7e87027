//! `flamingo shapes`: writes examples of the shapes world (the default model's training and
//! evaluation data) to a directory: `media/` (PNG images, GIF videos) and `examples.jsonl`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use flamingo_server::world::{self, Split};

#[derive(Args)]
pub struct ShapesArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Seed: the same seed and split give the same files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `train`: the training mixture; `eval`: the held-out evaluation set (`--n` per row of
    /// the `flamingo eval` table).
    #[arg(long, value_enum, default_value = "train")]
    split: Split,
    /// Number of examples (train) or examples per evaluation row (eval).
    #[arg(long, default_value_t = 100)]
    n: usize,
}

pub fn run(a: ShapesArgs) -> Result<()> {
    let total = match a.split {
        Split::Train => a.n,
        Split::Eval => a.n * world::EVAL_ROWS.len(),
    };
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("shapes");
    let written = match a.split {
        Split::Train => {
            let mut rng = world::rng(a.seed, Split::Train);
            let it = (0..a.n).map(move |_| world::training_example(&mut rng));
            world::write_dataset(&a.out, it, || bar.inc(1))
        }
        Split::Eval => world::write_dataset(&a.out, world::eval_set(a.seed, a.n).into_iter().map(|(_, e)| e), || bar.inc(1)),
    }
    .with_context(|| format!("writing {}", a.out.display()))?;
    bar.finish_and_clear();
    eprintln!("{written} examples in {}", a.out.join("examples.jsonl").display());
    Ok(())
}
