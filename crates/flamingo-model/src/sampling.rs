//! Decoding logic, with no model in it: logits processing (repetition penalty, temperature,
//! top-k, top-p), greedy and seeded sampling, log-probabilities, and beam search. The engine's
//! scheduler is the one decode loop that drives it (`flamingo generate` runs through the engine).
//!
//! Semantics follow HF transformers (4.57) `generate`, which OpenFlamingo's reference calls:
//! processors in the order repetition penalty -> temperature -> top-k -> top-p; greedy is the
//! first maximum; beam search is HF's vectorised beam search (top `2·num_beams` continuations,
//! finished hypotheses scored `sum_logprobs / generated_len^length_penalty`, the
//! `early_stopping=False` heuristic) over log-softmax scores with the repetition penalty applied
//! after the log-softmax, as HF's beam search does ([`beam_logprobs`]). The beam logic is a
//! plain state machine ([`BeamSearch`]) so a scheduler can drive it with batched forwards.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    Greedy,
    Sample { temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64 },
    Beam { num_beams: usize, length_penalty: f32, early_stopping: bool },
}

impl Strategy {
    /// Checks the strategy's own parameters (a message naming the parameter if they are wrong).
    pub fn check(&self) -> Result<(), String> {
        match self {
            Strategy::Greedy => Ok(()),
            Strategy::Sample { temperature, top_k, top_p, .. } => {
                if !(*temperature > 0.0 && temperature.is_finite()) {
                    return Err("temperature must be > 0 for sampling (use greedy for 0)".into());
                }
                if *top_k == Some(0) {
                    return Err("top_k must be at least 1".into());
                }
                if let Some(p) = top_p {
                    if !(*p > 0.0 && *p <= 1.0) {
                        return Err("top_p must be in (0, 1]".into());
                    }
                }
                Ok(())
            }
            Strategy::Beam { num_beams, length_penalty, .. } => {
                if *num_beams < 1 {
                    return Err("num_beams must be at least 1".into());
                }
                if !length_penalty.is_finite() {
                    return Err("length_penalty must be finite".into());
                }
                Ok(())
            }
        }
    }

    /// Rows a sequence with this strategy decodes per step.
    pub fn rows(&self) -> usize {
        match self {
            Strategy::Beam { num_beams, .. } => (*num_beams).max(1),
            _ => 1,
        }
    }
}

/// HF's `RepetitionPenaltyLogitsProcessor`: divides positive and multiplies negative logits of
/// every id seen so far.
pub fn apply_repetition_penalty<'a>(logits: &mut [f32], history: impl IntoIterator<Item = &'a u32>, penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for &id in history {
        if let Some(l) = logits.get_mut(id as usize) {
            if seen.insert(id) {
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }
}

/// Index of the first maximum (as `torch.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax` in f32 (max-subtracted).
pub fn log_softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = v.iter().map(|&x| (x - m).exp()).sum();
    let ls = s.ln();
    v.iter().map(|&x| x - m - ls).collect()
}

/// A beam's scores for its next token: the log-softmax of its logits, then the repetition
/// penalty over `history` (prompt and generated ids), as HF's beam search processes them.
pub fn beam_logprobs<'a>(logits: &[f32], history: impl IntoIterator<Item = &'a u32>, penalty: f32) -> Vec<f32> {
    let mut lp = log_softmax(logits);
    apply_repetition_penalty(&mut lp, history, penalty);
    lp
}

/// The log-probability of `token` under `logits` (before any processing) and the `k` most
/// likely tokens with theirs, most likely first (equal values: lower id first).
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> (Option<f32>, Vec<(u32, f32)>) {
    let lp = log_softmax(logits);
    let chosen = lp.get(token as usize).copied();
    let k = k.min(lp.len());
    if k == 0 {
        return (chosen, Vec::new());
    }
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| lp[b].total_cmp(&lp[a]));
    let mut top: Vec<(u32, f32)> = idx[..k].iter().map(|&i| (i as u32, lp[i])).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    (chosen, top)
}

/// Per-sequence token chooser for greedy and sampling.
pub struct Sampler {
    strategy: Strategy,
    repetition_penalty: f32,
    rng: Option<StdRng>,
}

impl Sampler {
    pub fn new(strategy: &Strategy, repetition_penalty: f32) -> Self {
        let rng = match strategy {
            Strategy::Sample { seed, .. } => Some(StdRng::seed_from_u64(*seed)),
            _ => None,
        };
        Self { strategy: strategy.clone(), repetition_penalty, rng }
    }

    /// Chooses the next token from raw logits, given every id so far (prompt + generated; read
    /// only for the repetition penalty).
    pub fn next<'a>(&mut self, logits: &[f32], history: impl IntoIterator<Item = &'a u32>) -> u32 {
        if self.rng.is_none() && self.repetition_penalty == 1.0 {
            // Greedy with nothing to change in the logits: no copy of the vocabulary's row.
            return argmax(logits);
        }
        let mut l = logits.to_vec();
        apply_repetition_penalty(&mut l, history, self.repetition_penalty);
        match (&self.strategy, self.rng.as_mut()) {
            (Strategy::Sample { temperature, top_k, top_p, .. }, Some(rng)) => {
                // HF's division; when the largest logit over a tiny temperature would overflow,
                // the logits are first shifted by it (the same softmax, no infinities).
                let m = l.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
                let shift = if (m / *temperature).is_infinite() && m.is_finite() { m } else { 0.0 };
                for x in l.iter_mut() {
                    *x = (*x - shift) / *temperature;
                }
                if let Some(k) = top_k {
                    top_k_filter(&mut l, *k);
                }
                if let Some(p) = top_p {
                    top_p_filter(&mut l, *p);
                }
                sample(&l, rng)
            }
            _ => argmax(&l),
        }
    }
}

/// HF `TopKLogitsWarper`: removes every logit below the k-th largest.
fn top_k_filter(l: &mut [f32], k: usize) {
    let k = k.min(l.len());
    // The k-th largest by selection, not a sort of the whole vocabulary (1.4 ms per token for
    // 50k logits).
    let mut sorted: Vec<f32> = l.to_vec();
    let (_, &mut kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    for x in l.iter_mut() {
        if *x < kth {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// HF `TopPLogitsWarper`: sorted ascending, removes tokens whose cumulative probability is
/// `<= 1 - top_p`, always keeping the most likely one.
fn top_p_filter(l: &mut [f32], p: f32) {
    let idx = ascending(l);
    let sorted: Vec<f32> = idx.iter().map(|&i| l[i]).collect();
    let probs = softmax(&sorted);
    let mut cum = 0f32;
    let n = l.len();
    for (rank, &i) in idx.iter().enumerate() {
        cum += probs[rank];
        if cum <= 1.0 - p && rank < n - 1 {
            l[i] = f32::NEG_INFINITY;
        }
    }
}

/// Indices of `l` in ascending order of [`f32::total_cmp`], equal values in index order (what a
/// stable sort gives): each value's order-preserving 32-bit key and its index packed into one
/// `u64` and sorted as integers. A stable sort of indices by a comparison of the values they
/// point at made top-p take 3.0 ms per token over 50k logits; with this, 1.7 ms.
fn ascending(l: &[f32]) -> Vec<usize> {
    let mut keys: Vec<u64> = l
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let b = x.to_bits();
            // Negative values: all bits flipped; others: the sign bit set.
            let key = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
            (u64::from(key) << 32) | i as u64
        })
        .collect();
    keys.sort_unstable();
    keys.into_iter().map(|k| (k & 0xffff_ffff) as usize).collect()
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::INFINITY {
        // Logits divided by a tiny temperature overflow: the limit of the softmax is uniform
        // over the largest (infinite) ones, where `x - m` would give NaN.
        let n = v.iter().filter(|&&x| x == m).count() as f32;
        return v.iter().map(|&x| if x == m { 1.0 / n } else { 0.0 }).collect();
    }
    let e: Vec<f32> = v.iter().map(|&x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn sample(l: &[f32], rng: &mut StdRng) -> u32 {
    let p = softmax(l);
    let u: f32 = rng.gen();
    let mut cum = 0f32;
    let mut last_nonzero = 0;
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            last_nonzero = i;
        }
        cum += pi;
        if u < cum {
            return i as u32;
        }
    }
    last_nonzero as u32
}

/// One candidate continuation in beam search.
#[derive(Debug, Clone)]
struct Candidate {
    score: f32,
    parent: usize,
    token: u32,
}

/// A finished hypothesis.
#[derive(Debug, Clone)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f32,
}

/// What the caller must do after a beam step: the running beams are now `tokens[i]` appended to
/// the state of old beam `parents[i]`.
#[derive(Debug, Clone)]
pub struct BeamStep {
    pub parents: Vec<usize>,
    pub tokens: Vec<u32>,
    pub done: bool,
}

/// HF's beam search for one request (batch of one), as a state machine.
pub struct BeamSearch {
    num_beams: usize,
    length_penalty: f32,
    early_stopping: bool,
    max_new_tokens: usize,
    eos: Vec<u32>,
    /// Generated tokens of each running beam.
    running: Vec<Vec<u32>>,
    running_scores: Vec<f32>,
    /// Finished hypotheses, best first (`num_beams` slots; empty slots have score -1e9).
    finished: Vec<(Hypothesis, bool)>,
    heuristic_unsatisfied: bool,
    generated: usize,
}

const NEG: f32 = -1.0e9;

impl BeamSearch {
    pub fn new(num_beams: usize, length_penalty: f32, early_stopping: bool, max_new_tokens: usize, eos: Vec<u32>) -> Self {
        let mut running_scores = vec![NEG; num_beams];
        running_scores[0] = 0.0;
        Self {
            num_beams,
            length_penalty,
            early_stopping,
            max_new_tokens,
            eos,
            running: vec![Vec::new(); num_beams],
            running_scores,
            finished: vec![(Hypothesis { tokens: vec![], score: NEG }, false); num_beams],
            heuristic_unsatisfied: true,
            generated: 0,
        }
    }

    pub fn num_beams(&self) -> usize {
        self.num_beams
    }

    /// Generated tokens of running beam `i`.
    pub fn running_tokens(&self, i: usize) -> &[u32] {
        &self.running[i]
    }

    fn lp(&self, len: usize) -> f32 {
        (len as f64).powf(self.length_penalty as f64) as f32
    }

    /// Advances with the processed log-probabilities of each running beam (`num_beams` rows).
    pub fn step(&mut self, logprobs: &[Vec<f32>]) -> BeamStep {
        let vocab = logprobs[0].len();
        let keep = 2.max(1 + self.eos.len()) * self.num_beams;
        // Top `keep` of (beam score + logprob) over all beams x vocab, in descending order
        // (ties: lower flat index first).
        let mut cands: Vec<Candidate> = Vec::with_capacity(keep + 1);
        for (b, row) in logprobs.iter().enumerate() {
            let base = self.running_scores[b];
            for (t, &lp) in row.iter().enumerate() {
                let score = lp + base;
                if cands.len() == keep && score <= cands[keep - 1].score {
                    continue;
                }
                let pos = cands.partition_point(|c| c.score >= score);
                cands.insert(pos, Candidate { score, parent: b, token: t as u32 });
                cands.truncate(keep);
            }
        }
        let _ = vocab;
        let at_max = self.generated + 1 >= self.max_new_tokens;
        let hits: Vec<bool> = cands.iter().map(|c| at_max || self.eos.contains(&c.token)).collect();

        // Next running beams: best non-finished candidates.
        let mut order: Vec<usize> = (0..cands.len()).collect();
        let penal = |i: usize| cands[i].score + if hits[i] { NEG } else { 0.0 };
        order.sort_by(|&a, &b| penal(b).total_cmp(&penal(a)).then(a.cmp(&b)));
        let next: Vec<usize> = order.into_iter().take(self.num_beams).collect();

        // Finished hypotheses: merge the old ones with candidates in the top `num_beams` that hit.
        let gen_len = self.generated + 1;
        let denom = self.lp(gen_len);
        let all_finished = self.finished.iter().all(|(_, f)| *f);
        let mut merged: Vec<(Hypothesis, bool)> = self.finished.clone();
        for (i, c) in cands.iter().enumerate() {
            let just_finished = hits[i] && i < self.num_beams;
            let mut s = c.score / denom;
            if all_finished && self.early_stopping {
                s += NEG;
            }
            if !self.heuristic_unsatisfied {
                s += NEG;
            }
            if !just_finished {
                s += NEG;
            }
            let mut tokens = self.running[c.parent].clone();
            tokens.push(c.token);
            merged.push((Hypothesis { tokens, score: s }, just_finished));
        }
        let mut idx: Vec<usize> = (0..merged.len()).collect();
        idx.sort_by(|&a, &b| merged[b].0.score.total_cmp(&merged[a].0.score).then(a.cmp(&b)));
        self.finished = idx.into_iter().take(self.num_beams).map(|i| merged[i].clone()).collect();

        let parents: Vec<usize> = next.iter().map(|&i| cands[i].parent).collect();
        let tokens: Vec<u32> = next.iter().map(|&i| cands[i].token).collect();
        self.running = next
            .iter()
            .map(|&i| {
                let mut t = self.running[cands[i].parent].clone();
                t.push(cands[i].token);
                t
            })
            .collect();
        self.running_scores = next.iter().map(|&i| penal(i)).collect();
        self.generated += 1;

        // Early-stop heuristic (early_stopping = False / True: best running at current length).
        let best_possible = self.running_scores[0] / self.lp(self.generated);
        let min_finished = self.finished.iter().map(|(h, _)| h.score).fold(f32::INFINITY, f32::min);
        let improvable = self.finished.iter().any(|(_, f)| best_possible > if *f { min_finished } else { NEG });
        self.heuristic_unsatisfied &= improvable;
        let exists_open = !(self.finished.iter().all(|(_, f)| *f) && self.early_stopping);
        let valid = !hits.iter().all(|&h| h);
        let done = !(self.heuristic_unsatisfied && exists_open && valid);
        BeamStep { parents, tokens, done }
    }

    /// The best finished hypothesis (or the best running beam if none finished).
    pub fn best(&self) -> Hypothesis {
        match self.finished.first() {
            Some((h, true)) => h.clone(),
            _ => Hypothesis { tokens: self.running[0].clone(), score: self.running_scores[0] },
        }
    }
}

/// The states of the next running beams: beam `i` continues from `old[parents[i]]`. The last
/// child of a parent takes its state; earlier children get copies (`fork`).
pub fn reorder_beams<S, E: From<String>>(
    old: Vec<S>,
    parents: &[usize],
    fork: impl Fn(&S) -> std::result::Result<S, E>,
) -> std::result::Result<Vec<S>, E> {
    let mut old: Vec<Option<S>> = old.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(parents.len());
    for (i, &p) in parents.iter().enumerate() {
        let later = parents[i + 1..].contains(&p);
        let slot = old.get_mut(p).ok_or_else(|| E::from(format!("beam parent {p} out of range")))?;
        let st = if later {
            fork(slot.as_ref().ok_or_else(|| E::from("beam state already taken".to_string()))?)?
        } else {
            slot.take().ok_or_else(|| E::from("beam state already taken".to_string()))?
        };
        out.push(st);
    }
    Ok(out)
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_temperatures_sample_among_the_largest_logits() {
        // 1e-40 is a positive f32; the logits over it overflow to +inf, and the draw must come
        // from the largest ones (as the limit T -> 0 does), not from NaN probabilities.
        let logits = [1.0, 3.0, -2.0, 3.0, 0.5];
        for seed in 0..20 {
            let mut s = Sampler::new(&Strategy::Sample { temperature: 1e-40, top_k: None, top_p: Some(0.9), seed }, 1.0);
            let id = s.next(&logits, &[]);
            assert!(id == 1 || id == 3, "seed {seed}: picked {id}");
        }
    }

    #[test]
    fn repetition_penalty_as_hf() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_and_top_p() {
        let mut l = vec![1.0, 3.0, 2.0, 0.0];
        top_k_filter(&mut l, 2);
        assert_eq!(l[0], f32::NEG_INFINITY);
        assert_eq!(l[3], f32::NEG_INFINITY);
        assert_eq!((l[1], l[2]), (3.0, 2.0));
        // probs ~ [0.032, 0.087, 0.237, 0.644]: top_p 0.7 keeps the two largest.
        let mut l = vec![0.0, 1.0, 2.0, 3.0];
        top_p_filter(&mut l, 0.7);
        assert_eq!(&l[..2], &[f32::NEG_INFINITY, f32::NEG_INFINITY]);
        assert_eq!(&l[2..], &[2.0, 3.0]);
    }

    #[test]
    fn ascending_is_a_stable_sort_by_total_cmp() {
        let mut x: Vec<f32> = (0..5000).map(|i| ((i * 7919 % 1013) as f32 - 500.0) * 0.25).collect();
        x.extend([0.0, -0.0, f32::NEG_INFINITY, f32::INFINITY, 1.5, 1.5, -0.0, f32::MIN_POSITIVE, -f32::MIN_POSITIVE]);
        let mut want: Vec<usize> = (0..x.len()).collect();
        want.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
        assert_eq!(ascending(&x), want);
    }

    #[test]
    fn top_k_keeps_the_k_largest_with_ties() {
        let l: Vec<f32> = (0..3000).map(|i| ((i * 31 % 97) as f32).sin()).collect();
        for k in [1, 2, 50, 97, 2999, 3000, 4000] {
            let mut got = l.clone();
            top_k_filter(&mut got, k);
            let mut sorted = l.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k.min(l.len()) - 1];
            let want: Vec<f32> = l.iter().map(|&x| if x < kth { f32::NEG_INFINITY } else { x }).collect();
            assert_eq!(got, want, "k = {k}");
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let s = Strategy::Sample { temperature: 1.0, top_k: None, top_p: None, seed: 7 };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = {
            let mut x = Sampler::new(&s, 1.0);
            (0..20).map(|_| x.next(&logits, &[])).collect()
        };
        let mut y = Sampler::new(&s, 1.0);
        let b: Vec<u32> = (0..20).map(|_| y.next(&logits, &[])).collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "sampling should not be constant");
    }

    #[test]
    fn beam_search_prefers_high_total_probability() {
        // Vocabulary 3, eos = 2. Step 1 from beam 0 only.
        let mut bs = BeamSearch::new(2, 1.0, false, 3, vec![2]);
        let rows = vec![log_softmax(&[2.0, 1.0, -5.0]), log_softmax(&[2.0, 1.0, -5.0])];
        let s = bs.step(&rows);
        assert!(!s.done);
        assert_eq!(s.parents, vec![0, 0]);
        assert_eq!(s.tokens, vec![0, 1]);
        // Step 2: beam 1 (token 1) is sure to end with eos; beam 0 is uncertain.
        let rows = vec![log_softmax(&[0.0, 0.0, 0.0]), log_softmax(&[-9.0, -9.0, 9.0])];
        let s = bs.step(&rows);
        assert!(!s.done);
        let best = bs.best();
        assert_eq!(best.tokens, vec![1, 2]);
    }
}
