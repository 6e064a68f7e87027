//! The shapes world's language: descriptions, questions (a canonical one and paraphrases per
//! task) and the reading of a model's answer back into attributes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::scene::{Colour, Motion, Scene, Shape};

/// What an example asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Colour,
    Shape,
    Count,
    Describe,
    Motion,
}

impl Task {
    pub const ALL: [Task; 5] = [Task::Colour, Task::Shape, Task::Count, Task::Describe, Task::Motion];
    /// The tasks a few-shot episode over still images can demonstrate.
    pub const FEW_SHOT: [Task; 4] = [Task::Colour, Task::Shape, Task::Count, Task::Describe];

    pub fn name(self) -> &'static str {
        match self {
            Task::Colour => "colour",
            Task::Shape => "shape",
            Task::Count => "count",
            Task::Describe => "description",
            Task::Motion => "motion",
        }
    }

    /// The questions that ask this task: the canonical one first, then paraphrases.
    pub fn questions(self) -> &'static [&'static str] {
        match self {
            Task::Colour => &[
                "What color is the shape?",
                "What colour is the shape?",
                "Which color is it?",
                "What is the color of the shape?",
                "What color is this shape?",
                "Tell me the color of the shape.",
            ],
            Task::Shape => &[
                "What shape is it?",
                "Which shape is this?",
                "What kind of shape is shown?",
                "What is the shape?",
                "Name the shape.",
                "What shape do you see?",
            ],
            Task::Count => &[
                "How many shapes are there?",
                "How many shapes do you see?",
                "Count the shapes.",
                "What is the number of shapes?",
                "How many objects are in the image?",
                "How many shapes are in the picture?",
            ],
            Task::Describe => &[
                "Describe the image.",
                "What is in the picture?",
                "What do you see?",
                "Describe this picture.",
                "What does the image show?",
                "What is in the image?",
            ],
            Task::Motion => &[
                "Which way is the shape moving?",
                "In which direction does the shape move?",
                "Where is the shape going?",
                "What direction is it moving?",
                "Which direction is the shape moving in?",
                "Which way does it move?",
            ],
        }
    }

    /// Every answer the task can have when the set is closed (what a classification ranks):
    /// the colour, shape and motion words, the counts `1` to `4` (a scene holds 1 to 4 shapes);
    /// None for the description, whose answers are open.
    pub fn answer_set(self) -> Option<Vec<&'static str>> {
        match self {
            Task::Colour => Some(Colour::ALL.iter().map(|c| c.word()).collect()),
            Task::Shape => Some(Shape::ALL.iter().map(|s| s.word()).collect()),
            Task::Count => Some(COUNTS.to_vec()),
            Task::Describe => None,
            Task::Motion => Some(Motion::ALL.iter().map(|m| m.word()).collect()),
        }
    }
}

/// The answers of the count task, as [`answer`] writes them.
const COUNTS: [&str; 4] = ["1", "2", "3", "4"];

/// The prompt of a few-shot episode's turns: uninformative, so only the demonstrations say
/// which task is meant.
pub const FEW_SHOT_PROMPT: &str = "Output:";

const NUMBER_WORDS: [&str; 5] = ["zero", "one", "two", "three", "four"];

/// The shapes of a scene as a multiset of (colour, shape).
pub fn attributes(scene: &Scene) -> BTreeMap<(Colour, Shape), usize> {
    let mut m = BTreeMap::new();
    for p in &scene.shapes {
        *m.entry((p.colour, p.shape)).or_insert(0) += 1;
    }
    m
}

/// "a red circle and two blue squares": groups in canonical (colour, shape) order.
pub fn describe(scene: &Scene) -> String {
    let groups: Vec<String> = attributes(scene)
        .into_iter()
        .map(|((c, s), n)| {
            if n == 1 {
                let article = if c.word().starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
                format!("{article} {} {}", c.word(), s.word())
            } else {
                format!("{} {} {}s", NUMBER_WORDS[n.min(4)], c.word(), s.word())
            }
        })
        .collect();
    match groups.len() {
        0 => "nothing".to_string(),
        1 => groups[0].clone(),
        n => format!("{} and {}", groups[..n - 1].join(", "), groups[n - 1]),
    }
}

/// The answer to `task` about a still image (`motion` for a video).
pub fn answer(task: Task, scene: &Scene, motion: Option<Motion>) -> String {
    match task {
        Task::Colour => scene.shapes.first().map_or("", |p| p.colour.word()).to_string(),
        Task::Shape => scene.shapes.first().map_or("", |p| p.shape.word()).to_string(),
        Task::Count => scene.shapes.len().to_string(),
        Task::Describe => describe(scene),
        Task::Motion => motion.map_or("", Motion::word).to_string(),
    }
}

fn words(text: &str) -> Vec<String> {
    text.to_lowercase().split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).map(String::from).collect()
}

fn count_word(w: &str) -> Option<usize> {
    match w {
        "a" | "an" | "one" | "1" => Some(1),
        "two" | "2" => Some(2),
        "three" | "3" => Some(3),
        "four" | "4" => Some(4),
        _ => None,
    }
}

fn colour_word(w: &str) -> Option<Colour> {
    Colour::ALL.into_iter().find(|c| c.word() == w)
}

fn shape_word(w: &str) -> Option<Shape> {
    let w = w.strip_suffix('s').filter(|s| Shape::ALL.iter().any(|x| x.word() == *s)).unwrap_or(w);
    Shape::ALL.into_iter().find(|s| s.word() == w)
}

/// Reads a description ("a red circle and two blue squares") back into its multiset; None
/// when it is not a list of "<count> <colour> <shape>" groups.
pub fn parse_description(text: &str) -> Option<BTreeMap<(Colour, Shape), usize>> {
    let ws: Vec<String> = words(text).into_iter().filter(|w| w != "and").collect();
    if ws.is_empty() || !ws.len().is_multiple_of(3) {
        return None;
    }
    let mut m = BTreeMap::new();
    for g in ws.chunks(3) {
        let n = count_word(&g[0])?;
        let key = (colour_word(&g[1])?, shape_word(&g[2])?);
        *m.entry(key).or_insert(0) += n;
    }
    Some(m)
}

/// Whether `reply` answers `task` as `truth` (the generator's answer) does: one word for
/// colour, shape and motion, a digit or a number word for a count, the same multiset of
/// attributes for a description.
pub fn is_correct(task: Task, reply: &str, truth: &str) -> bool {
    let got = words(reply);
    match task {
        Task::Describe => match (parse_description(reply), parse_description(truth)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
        Task::Count => got.len() == 1 && count_word(&got[0]).is_some() && count_word(&got[0]) == truth.parse().ok(),
        _ => got.len() == 1 && got[0] == truth,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::scene::Placed;

    fn scene(items: &[(Colour, Shape)]) -> Scene {
        let shapes = items.iter().map(|&(colour, shape)| Placed { shape, colour, rgb: [0, 0, 0], x: 0.0, y: 0.0, size: 1.0 }).collect();
        Scene { width: 64, height: 64, background: [255; 3], shapes }
    }

    #[test]
    fn descriptions_group_and_count() {
        use Colour::*;
        use Shape::*;
        assert_eq!(describe(&scene(&[(Red, Circle)])), "a red circle");
        assert_eq!(describe(&scene(&[(Blue, Square), (Red, Circle), (Blue, Square)])), "a red circle and two blue squares");
        assert_eq!(
            describe(&scene(&[(Orange, Triangle), (Green, Square), (Red, Circle), (Green, Square)])),
            "a red circle, two green squares and an orange triangle"
        );
    }

    #[test]
    fn descriptions_read_back() {
        use Colour::*;
        use Shape::*;
        let s = scene(&[(Blue, Square), (Red, Circle), (Blue, Square), (Yellow, Triangle)]);
        assert_eq!(parse_description(&describe(&s)), Some(attributes(&s)));
        assert_eq!(parse_description("two blue squares, a red circle and one yellow triangle."), Some(attributes(&s)));
        assert_eq!(parse_description("a red"), None);
        assert_eq!(parse_description("a red dog"), None);
        assert!(is_correct(Task::Describe, "two blue squares and a red circle and a yellow triangle", &describe(&s)));
        assert!(!is_correct(Task::Describe, "a blue square and a red circle and a yellow triangle", &describe(&s)));
    }

    #[test]
    fn short_answers() {
        assert!(is_correct(Task::Count, "3", "3"));
        assert!(is_correct(Task::Count, " three.", "3"));
        assert!(!is_correct(Task::Count, "4", "3"));
        assert!(!is_correct(Task::Count, "3 4", "3"));
        assert!(is_correct(Task::Colour, " Red.", "red"));
        assert!(!is_correct(Task::Colour, "a red circle", "red"));
        assert!(!is_correct(Task::Motion, "", "left"));
    }

    #[test]
    fn every_task_has_a_canonical_question_and_paraphrases() {
        for t in Task::ALL {
            let q = t.questions();
            assert!(q.len() >= 4);
            let distinct: std::collections::BTreeSet<_> = q.iter().collect();
            assert_eq!(distinct.len(), q.len());
        }
    }
}
