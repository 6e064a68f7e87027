//! The engine handle: a scheduler loop on its own thread, fed through a channel. Model work is
//! blocking work, so it never runs on the async workers; callers only await event streams.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::error::{EngineError, RequestError};
use crate::metrics as m;
use crate::request::{Event, ModelSpec, PreparedMedia, SamplingParams, ValidRequest};
pub use crate::scheduler::SchedulerConfig as EngineConfig;
use crate::scheduler::{Scheduler, StepReport};

/// The events of one request. Dropping it cancels the request at the next step.
pub type EventStream = UnboundedReceiver<Event>;

enum Command {
    Submit(ValidRequest, UnboundedSender<Event>),
    /// Releases a pinned set; answers whether it was pinned.
    Unpin(String, oneshot::Sender<bool>),
    /// Image embeddings of media (between steps, on the model's thread).
    Embed(Vec<PreparedMedia>, oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>),
    Shutdown,
}

/// Counters of one engine (the `metrics` facade is process-wide; these are this engine's own).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences running after the last step.
    pub running: AtomicUsize,
    /// Sequences cancelled (their stream dropped) so far.
    pub cancelled: AtomicUsize,
    /// Sequences finished (stop or length) so far.
    pub finished: AtomicUsize,
    /// Prompt tokens computed so far (prefix-cache hits excluded).
    pub prefill_tokens: AtomicUsize,
    /// Bytes pinned by demonstration sets after the last step.
    pub pinned_bytes: AtomicUsize,
    /// Pinned sets after the last step.
    pub pinned_sets: AtomicUsize,
}

pub struct Engine {
    tx: mpsc::Sender<Command>,
    spec: ModelSpec,
    kv_budget_bytes: usize,
    stats: Arc<EngineStats>,
    /// Submitted but not yet admitted (or dropped): the bound of the waiting queue.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the scheduler thread.
    pub fn start<B: Backend>(backend: B, cfg: EngineConfig) -> Self {
        m::describe();
        let (tx, rx) = mpsc::channel::<Command>();
        let waiting = Arc::new(AtomicUsize::new(0));
        let (max_waiting, kv_budget_bytes) = (cfg.max_waiting, cfg.kv_budget_bytes);
        let spec = backend.spec();
        let counter = waiting.clone();
        let stats = Arc::new(EngineStats::default());
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("flamingo-engine".into())
            .spawn(move || on_compute_pool(move || run(Scheduler::new(backend, cfg), rx, counter, st)))
            .expect("spawning the engine thread");
        Self { tx, spec, kv_budget_bytes, stats, waiting, max_waiting, thread: Some(thread) }
    }

    /// What requests are checked against ([`ValidRequest::new`]).
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Refuses, before any work is done for it, a request that could never be admitted: its
    /// KV reservation (prompt, plus `max_new_tokens` for each beam) is larger than the budget.
    pub fn check_budget(&self, prompt_tokens: usize, sampling: &SamplingParams, max_new_tokens: usize) -> Result<(), RequestError> {
        self.spec.check_budget(prompt_tokens, sampling, max_new_tokens, self.kv_budget_bytes)
    }

    /// Queues a request; its events arrive on the returned stream. Fails at once with
    /// `Overloaded` when the waiting queue is full, and with a [`RequestError`] when the
    /// request is larger than the KV budget.
    pub fn submit(&self, req: ValidRequest) -> Result<EventStream, EngineError> {
        req.check_budget(&self.spec, self.kv_budget_bytes)?;
        let n = self.waiting.fetch_add(1, Ordering::SeqCst);
        if n >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!(m::REJECTIONS).increment(1);
            return Err(EngineError::Overloaded(n));
        }
        let (etx, erx) = unbounded_channel();
        if self.tx.send(Command::Submit(req, etx)).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Stopped);
        }
        Ok(erx)
    }

    /// Releases a pinned set (its blocks and media become ordinary cache entries). Returns
    /// whether the engine had it pinned.
    pub async fn unpin(&self, set: &str) -> Result<bool, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Unpin(set.to_string(), tx)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// The normalised image embedding of each media item's first frame (computed on the
    /// engine's thread between steps).
    pub async fn embed(&self, media: Vec<PreparedMedia>) -> Result<Vec<Vec<f32>>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Embed(media, tx)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// This engine's counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Requests submitted and not yet admitted.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `f` on a worker of a rayon pool of its own, sized as rayon's global pool would be
/// (`RAYON_NUM_THREADS`, else one thread per CPU), and returns its result. The model's parallel
/// kernels called from `f` then run in that pool with the calling thread taking part, instead of
/// handing every operation to the global pool's threads and sleeping until they finish: one
/// sequence decodes ~9% faster on this project's 2-core machine (a decode step makes ~150 such
/// calls). If the pool cannot be built, `f` runs on this thread.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new().thread_name(|i| format!("flamingo-compute-{i}")).build() {
        Ok(pool) => pool.install(f),
        Err(e) => {
            tracing::warn!("no compute thread pool ({e}); using rayon's global pool");
            f()
        }
    }
}

fn run<B: Backend>(mut sched: Scheduler<B>, rx: mpsc::Receiver<Command>, waiting: Arc<AtomicUsize>, stats: Arc<EngineStats>) {
    let mut shutting_down = false;
    let mut left_waiting = 0;
    loop {
        // Block only when idle; otherwise take what has arrived and keep stepping.
        if !sched.has_work() {
            if shutting_down {
                return;
            }
            match rx.recv() {
                Ok(cmd) => handle(&mut sched, cmd, &waiting, &stats, &mut shutting_down),
                Err(_) => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            handle(&mut sched, cmd, &waiting, &stats, &mut shutting_down);
        }
        let report = match contained("a scheduling step", || sched.step()) {
            Ok(report) => report,
            Err(message) => {
                // The running requests fail with a 500; the engine goes on with the others.
                let failed = sched.fail_running(EngineError::Internal(format!("internal error: {message}")));
                StepReport { finished: failed, ..StepReport::default() }
            }
        };
        // Counted as requests leave the queue, so a step that panicked leaves no count behind.
        let left = sched.left_waiting_total();
        waiting.fetch_sub(left - left_waiting, Ordering::SeqCst);
        left_waiting = left;
        // Counters first, then `running`: a caller that sees the engine idle sees its counts.
        stats.prefill_tokens.fetch_add(report.prefill_tokens, Ordering::SeqCst);
        stats.running.store(sched.running_len(), Ordering::SeqCst);
        stats.cancelled.fetch_add(report.cancelled, Ordering::SeqCst);
        stats.finished.fetch_add(report.finished, Ordering::SeqCst);
        stats.pinned_bytes.store(sched.pinned_bytes(), Ordering::SeqCst);
        stats.pinned_sets.store(sched.pinned_sets().len(), Ordering::SeqCst);
    }
}

/// Runs `f`, containing a panic inside it: the panic is logged with its message, counted
/// (`flamingo_panics_total{where="engine"}`) and returned as an error message, and the engine
/// thread lives on.
fn contained<R>(what: &str, f: impl FnOnce() -> R) -> Result<R, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let message = panic_message(payload.as_ref());
        tracing::error!(panic = %message, "the engine panicked in {what}; the requests it was running fail, the engine goes on");
        metrics::counter!(m::PANICS, "where" => "engine").increment(1);
        format!("the engine panicked ({message})")
    })
}

/// The message a panic was raised with (`panic!`'s text), when it has one.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "no message".to_string(),
    }
}

fn handle<B: Backend>(sched: &mut Scheduler<B>, cmd: Command, waiting: &AtomicUsize, stats: &EngineStats, shutting_down: &mut bool) {
    match cmd {
        Command::Unpin(set, tx) => {
            let was = contained("unpinning a set", || sched.unpin(&set)).unwrap_or(false);
            // Counted before the answer, so a caller that was answered sees the bytes freed.
            stats.pinned_bytes.store(sched.pinned_bytes(), Ordering::SeqCst);
            stats.pinned_sets.store(sched.pinned_sets().len(), Ordering::SeqCst);
            let _ = tx.send(was);
        }
        Command::Embed(media, tx) => {
            let out =
                contained("an image embedding", || media.iter().map(|m| sched.backend().embed(m).map_err(EngineError::from)).collect())
                    .unwrap_or_else(|message| Err(EngineError::Internal(format!("internal error: {message}"))));
            let _ = tx.send(out);
        }
        Command::Submit(req, tx) => {
            let refused = if *shutting_down { Err(EngineError::Stopped) } else { sched.submit(req, tx.clone()).map(|_| ()) };
            if let Err(e) = refused {
                let _ = tx.send(Event::Error(e));
                waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
        // In-flight requests finish; new ones are refused.
        Command::Shutdown => *shutting_down = true,
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_string()
    }

    #[test]
    fn compute_pool_runs_the_closure_and_its_parallel_work_in_its_own_threads() {
        let (inside, workers, value) = super::on_compute_pool(|| {
            let workers: Vec<String> = (0..64).into_par_iter().map(|_| thread_name()).collect();
            (thread_name(), workers, 7)
        });
        assert!(inside.starts_with("flamingo-compute-"), "{inside}");
        assert!(workers.iter().all(|w| w.starts_with("flamingo-compute-")), "{workers:?}");
        assert_eq!(value, 7);
    }
}
