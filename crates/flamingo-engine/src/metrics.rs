//! Every metric the engine records: names and descriptions in one place. Recorded through the
//! `metrics` facade; the server installs a Prometheus recorder (without one they are no-ops).

pub const WAITING: &str = "flamingo_requests_waiting";
pub const RUNNING: &str = "flamingo_requests_running";
pub const BATCH_SIZE: &str = "flamingo_batch_sequences";
pub const STEP_TOKENS: &str = "flamingo_batch_tokens";
pub const PREFILL_TOKENS: &str = "flamingo_prefill_tokens_total";
pub const DECODE_TOKENS: &str = "flamingo_decode_tokens_total";
pub const TIME_TO_FIRST_TOKEN: &str = "flamingo_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "flamingo_inter_token_latency_seconds";
pub const REQUESTS_FINISHED: &str = "flamingo_requests_finished_total";
pub const REJECTIONS: &str = "flamingo_requests_rejected_total";
pub const CANCELLATIONS: &str = "flamingo_requests_cancelled_total";
pub const KV_BYTES: &str = "flamingo_kv_cache_bytes";
pub const CACHE_QUERIES: &str = "flamingo_cache_queries_total";
pub const CACHE_HITS: &str = "flamingo_cache_hits_total";
pub const CACHE_BYTES: &str = "flamingo_cache_bytes";
pub const CACHE_EVICTIONS: &str = "flamingo_cache_evictions_total";
pub const PINNED_BYTES: &str = "flamingo_pinned_bytes";
pub const PINNED_SETS: &str = "flamingo_pinned_sets";
pub const SCORED_TOKENS: &str = "flamingo_scored_tokens_total";
/// Panics caught (by where: `engine` for the scheduler thread, `http` for a request handler).
pub const PANICS: &str = "flamingo_panics_total";

/// Label values of the `cache` label.
pub const VISION_CACHE: &str = "vision";
pub const PREFIX_CACHE: &str = "prefix";

/// Registers descriptions with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(WAITING, "Requests waiting for admission");
    describe_gauge!(RUNNING, "Requests being prefilled or decoded");
    describe_histogram!(BATCH_SIZE, "Sequences in one engine step");
    describe_histogram!(STEP_TOKENS, "Tokens (prefill + decode) in one engine step");
    describe_counter!(PREFILL_TOKENS, "Prompt tokens computed (cache hits excluded)");
    describe_counter!(DECODE_TOKENS, "Tokens generated");
    describe_histogram!(TIME_TO_FIRST_TOKEN, Unit::Seconds, "Submission to first generated token");
    describe_histogram!(INTER_TOKEN_LATENCY, Unit::Seconds, "Time between consecutive tokens of a request");
    describe_counter!(REQUESTS_FINISHED, "Requests finished, by reason (stop, length, error)");
    describe_counter!(REJECTIONS, "Requests refused because the waiting queue was full");
    describe_counter!(CANCELLATIONS, "Requests whose event stream was dropped before they finished");
    describe_gauge!(KV_BYTES, Unit::Bytes, "Bytes of state running sequences refer to: their KV caches plus the cross-attention K/V of their images (shared with the vision cache and with other sequences showing the same images, so counted once per sequence)");
    describe_counter!(CACHE_QUERIES, "Cache lookups, by cache (vision, prefix)");
    describe_counter!(CACHE_HITS, "Cache hits, by cache (vision: images; prefix: blocks)");
    describe_gauge!(CACHE_BYTES, Unit::Bytes, "Bytes held by each cache");
    describe_counter!(CACHE_EVICTIONS, "Entries evicted from each cache");
    describe_gauge!(
        PINNED_BYTES,
        Unit::Bytes,
        "Bytes pinned by demonstration sets (prefix K/V blocks and image cross-attention K/V), outside both caches"
    );
    describe_gauge!(PINNED_SETS, "Demonstration sets pinned in the engine");
    describe_counter!(SCORED_TOKENS, "Candidate tokens scored after their prompt (not counted as prefill)");
    describe_counter!(PANICS, "Panics caught and contained, by where (engine, http): each is a bug, logged with its message");
}
