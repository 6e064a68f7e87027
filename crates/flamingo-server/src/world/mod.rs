//! The shapes world: the one definition of the synthetic visual world the default model
//! (flamingo-mini) is trained and evaluated on. Seeded generators of images, videos, captions,
//! questions and few-shot episodes; the training pipeline reads what `flamingo shapes` writes,
//! `flamingo eval` and the tests build the same examples in memory.
//!
//! An example is a chat as a user sends it to `/v1/chat/completions` (rendered by the
//! `openflamingo` template into the prompt the model sees) and the expected reply:
//! - a question: user `[media, question]`, reply e.g. `red`;
//! - a few-shot episode: `shots` demonstrations user `[image, "Output:"]` / assistant `answer`,
//!   then user `[image, "Output:"]`, reply the same task's answer on the last image. With no
//!   demonstrations the reply is the image's description (a caption, as OpenFlamingo's
//!   `<image>Output:` captioning prompt has it).

pub mod scene;
pub mod text;

use std::io::Write;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

pub use scene::{Colour, Motion, Placed, Scene, Shape, Video};
pub use text::{is_correct, Task, FEW_SHOT_PROMPT};

use crate::api::ChatMessage;
use crate::template;

/// An image or a video of the world.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Media {
    Image(Scene),
    Video(Video),
}

impl Media {
    /// PNG for an image, an animated GIF (4 frames, 250 ms each) for a video.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Media::Image(s) => {
                // Writing a PNG to memory cannot fail for an RGB8 buffer of a valid size.
                let _ = s.draw().write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png);
            }
            Media::Video(v) => {
                let mut enc = image::codecs::gif::GifEncoder::new_with_speed(&mut out, 10);
                let _ = enc.set_repeat(image::codecs::gif::Repeat::Infinite);
                let frames = v.frames.iter().map(|f| {
                    let rgba = image::DynamicImage::ImageRgb8(f.draw()).to_rgba8();
                    image::Frame::from_parts(rgba, 0, 0, image::Delay::from_numer_denom_ms(250, 1))
                });
                let _ = enc.encode_frames(frames);
            }
        }
        out
    }

    pub fn extension(&self) -> &'static str {
        match self {
            Media::Image(_) => "png",
            Media::Video(_) => "gif",
        }
    }

    /// What a caption says: the description, and for a video the motion.
    pub fn caption(&self) -> String {
        match self {
            Media::Image(s) => text::describe(s),
            Media::Video(v) => match v.frames.first() {
                Some(f) => format!("{} moving {}", text::describe(f), v.motion.word()),
                None => String::new(),
            },
        }
    }

    fn answer(&self, task: Task) -> String {
        match self {
            Media::Image(s) => text::answer(task, s, None),
            Media::Video(v) => v.frames.first().map_or_else(String::new, |f| text::answer(task, f, Some(v.motion))),
        }
    }
}

/// One turn of an example: a media item and the user's text, and (for a demonstration) the
/// assistant's reply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Turn {
    pub media: usize,
    pub text: String,
    pub reply: Option<String>,
}

/// A chat and the reply it should get.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Example {
    pub task: Task,
    /// Few-shot episodes: the number of demonstrations; None for a question.
    pub shots: Option<usize>,
    /// Questions: the index into `task.questions()` (0 = canonical).
    pub question: Option<usize>,
    pub media: Vec<Media>,
    pub turns: Vec<Turn>,
    pub answer: String,
}

fn media_for(rng: &mut ChaCha8Rng, task: Task) -> Media {
    match task {
        Task::Colour | Task::Shape => Media::Image(scene::sample_scene(rng, 1)),
        Task::Count | Task::Describe => {
            let n = rng.gen_range(1..=4);
            Media::Image(scene::sample_scene(rng, n))
        }
        Task::Motion => Media::Video(scene::sample_video(rng)),
    }
}

impl Example {
    /// A question about a new image (a video for motion).
    pub fn question(rng: &mut ChaCha8Rng, task: Task, question: usize) -> Self {
        let m = media_for(rng, task);
        let q = task.questions();
        let text = q[question.min(q.len() - 1)].to_string();
        let answer = m.answer(task);
        Example { task, shots: None, question: Some(question), media: vec![m], turns: vec![Turn { media: 0, text, reply: None }], answer }
    }

    /// `shots` demonstrations of a task under the `Output:` prompt, then a new image. With 0
    /// shots the task is the description.
    pub fn few_shot(rng: &mut ChaCha8Rng, task: Task, shots: usize) -> Self {
        let task = if shots == 0 { Task::Describe } else { task };
        let media: Vec<Media> = (0..=shots).map(|_| media_for(rng, task)).collect();
        let mut turns: Vec<Turn> = Vec::with_capacity(shots + 1);
        for (i, m) in media.iter().enumerate() {
            let reply = (i < shots).then(|| m.answer(task));
            turns.push(Turn { media: i, text: FEW_SHOT_PROMPT.to_string(), reply });
        }
        let answer = media.last().map_or_else(String::new, |m| m.answer(task));
        Example { task, shots: Some(shots), question: None, media, turns, answer }
    }

    /// The chat as OpenAI messages, media referred to by `urls` (one per media item).
    pub fn messages(&self, urls: &[String]) -> Vec<Value> {
        let mut out = Vec::new();
        for t in &self.turns {
            let url = urls.get(t.media).cloned().unwrap_or_default();
            let part = match self.media.get(t.media) {
                Some(Media::Video(_)) => json!({"type": "video_url", "video_url": {"url": url}}),
                _ => json!({"type": "image_url", "image_url": {"url": url}}),
            };
            out.push(json!({"role": "user", "content": [part, {"type": "text", "text": t.text}]}));
            if let Some(r) = &t.reply {
                out.push(json!({"role": "assistant", "content": r}));
            }
        }
        out
    }

    /// The prompt the `openflamingo` template makes of the chat, e.g.
    /// `<image>Output: red<|endofchunk|><image>Output:`.
    pub fn prompt(&self) -> String {
        let urls: Vec<String> = (0..self.media.len()).map(|i| format!("m{i}")).collect();
        let msgs: Vec<ChatMessage> = self.messages(&urls).into_iter().filter_map(|m| serde_json::from_value(m).ok()).collect();
        template::openflamingo(&msgs).map(|p| p.to_prompt_string()).unwrap_or_default()
    }
}

/// Which random stream a set is drawn from: the training data and the held-out evaluation set
/// never share one, whatever the seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    Eval,
}

/// The generator of a split.
pub fn rng(seed: u64, split: Split) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(match split {
        Split::Train => 1,
        Split::Eval => 2,
    });
    r
}

/// One training example: 55% questions (every task and paraphrase; the canonical question a
/// third of the time), 10% captions (`<image>Output:` with no demonstrations), 35% few-shot
/// episodes of 1 to 4 demonstrations.
pub fn training_example(rng: &mut ChaCha8Rng) -> Example {
    let r: f64 = rng.gen();
    if r < 0.55 {
        let task = Task::ALL[rng.gen_range(0..Task::ALL.len())];
        let n = task.questions().len();
        let q = if rng.gen_bool(1.0 / 3.0) { 0 } else { rng.gen_range(1..n) };
        Example::question(rng, task, q)
    } else if r < 0.65 {
        Example::few_shot(rng, Task::Describe, 0)
    } else {
        let task = Task::FEW_SHOT[rng.gen_range(0..Task::FEW_SHOT.len())];
        let shots = rng.gen_range(1..=4);
        Example::few_shot(rng, task, shots)
    }
}

/// The rows of the evaluation table, in order.
pub const EVAL_ROWS: &[&str] = &["colour", "shape", "count", "description", "motion", "paraphrases", "0-shot", "2-shot", "4-shot"];

/// The held-out evaluation set: `n` examples per row of [`EVAL_ROWS`]. Questions rows use the
/// canonical question; `paraphrases` spreads over every task and non-canonical question;
/// the few-shot rows over the four still-image tasks (scored against the demonstrated task,
/// so 0-shot is right only where the task happens to be the description).
pub fn eval_set(seed: u64, n: usize) -> Vec<(&'static str, Example)> {
    let mut rng = rng(seed, Split::Eval);
    let mut out = Vec::with_capacity(n * EVAL_ROWS.len());
    for &row in EVAL_ROWS {
        for i in 0..n {
            let ex = match row {
                "paraphrases" => {
                    let task = Task::ALL[i % Task::ALL.len()];
                    let q = rng.gen_range(1..task.questions().len());
                    Example::question(&mut rng, task, q)
                }
                "0-shot" | "2-shot" | "4-shot" => {
                    let shots = row[..1].parse().unwrap_or(0);
                    let task = Task::FEW_SHOT[i % Task::FEW_SHOT.len()];
                    let mut ex = Example::few_shot(&mut rng, task, shots);
                    if shots == 0 {
                        // Scored against the task the row stands for.
                        ex.answer = ex.media.last().map_or_else(String::new, |m| m.answer(task));
                        ex.task = task;
                    }
                    ex
                }
                _ => {
                    let task = Task::ALL.into_iter().find(|t| t.name() == row).unwrap_or(Task::Colour);
                    Example::question(&mut rng, task, 0)
                }
            };
            out.push((row, ex));
        }
    }
    out
}

/// A media file as the training pipeline reads it.
#[derive(Serialize)]
struct MediaRecord {
    file: String,
    kind: &'static str,
    caption: String,
}

/// One line of `examples.jsonl`.
#[derive(Serialize)]
struct ExampleRecord<'a> {
    task: Task,
    shots: Option<usize>,
    question: Option<usize>,
    media: Vec<MediaRecord>,
    /// The prompt the server builds from the chat.
    prompt: String,
    answer: &'a str,
}

/// Writes `examples` under `dir`: the media as `media/NNNNNNN.{png,gif}`, one JSON line per
/// example in `examples.jsonl`. `progress` is called after each example.
pub fn write_dataset(dir: &Path, examples: impl Iterator<Item = Example>, mut progress: impl FnMut()) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir.join("media"))?;
    let mut lines = std::io::BufWriter::new(std::fs::File::create(dir.join("examples.jsonl"))?);
    let mut next = 0usize;
    let mut count = 0;
    for ex in examples {
        let mut media = Vec::with_capacity(ex.media.len());
        for m in &ex.media {
            let file = format!("media/{next:07}.{}", m.extension());
            next += 1;
            std::fs::write(dir.join(&file), m.encode())?;
            let kind = match m {
                Media::Image(_) => "image",
                Media::Video(_) => "video",
            };
            media.push(MediaRecord { file, kind, caption: m.caption() });
        }
        let rec = ExampleRecord { task: ex.task, shots: ex.shots, question: ex.question, media, prompt: ex.prompt(), answer: &ex.answer };
        serde_json::to_writer(&mut lines, &rec)?;
        lines.write_all(b"\n")?;
        count += 1;
        progress();
    }
    lines.flush()?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_the_servers() {
        let mut r = rng(1, Split::Train);
        let ex = Example::few_shot(&mut r, Task::Colour, 2);
        let want = format!(
            "<image>Output: {}<|endofchunk|><image>Output: {}<|endofchunk|><image>Output:",
            ex.media[0].answer(Task::Colour),
            ex.media[1].answer(Task::Colour)
        );
        assert_eq!(ex.prompt(), want);
        let q = Example::question(&mut r, Task::Motion, 0);
        assert_eq!(q.prompt(), "<image>Which way is the shape moving?");
        assert!(matches!(q.media[0], Media::Video(_)));
        assert!(Motion::ALL.iter().any(|m| m.word() == q.answer));
    }

    #[test]
    fn the_same_seed_gives_the_same_set_and_splits_differ() {
        let a = eval_set(3, 2);
        let b = eval_set(3, 2);
        assert_eq!(a, b);
        let mut t = rng(3, Split::Train);
        let train: Vec<Example> = (0..20).map(|_| training_example(&mut t)).collect();
        assert!(a.iter().all(|(_, e)| !train.contains(e)));
        assert_eq!(a.len(), 2 * EVAL_ROWS.len());
    }

    #[test]
    fn zero_shot_rows_are_scored_against_their_task() {
        let set = eval_set(5, 8);
        let zero: Vec<&Example> = set.iter().filter(|(r, _)| *r == "0-shot").map(|(_, e)| e).collect();
        assert!(zero.iter().any(|e| e.task == Task::Colour));
        for e in zero {
            assert_eq!(e.prompt(), "<image>Output:");
            assert_eq!(e.answer, e.media[0].answer(e.task));
        }
    }

    #[test]
    fn media_encode_and_decode() {
        let mut r = rng(2, Split::Train);
        let v = Media::Video(scene::sample_video(&mut r));
        let bytes = v.encode();
        let frames = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(&bytes)).and_then(|d| {
            use image::AnimationDecoder;
            d.into_frames().collect_frames()
        });
        assert_eq!(frames.map(|f| f.len()).ok(), Some(scene::VIDEO_FRAMES));
        let img = Media::Image(scene::sample_scene(&mut r, 3));
        let png = image::load_from_memory(&img.encode()).map(|i| i.to_rgb8());
        match (&img, png) {
            (Media::Image(s), Ok(p)) => assert_eq!(p, s.draw()),
            _ => panic!("png did not decode"),
        }
    }
}
