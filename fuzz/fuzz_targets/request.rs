//! `cargo fuzz run --features libfuzzer request`: see `flamingo_fuzz::request`.
#![no_main]

#[global_allocator]
static ALLOC: flamingo_fuzz::alloc::Capped = flamingo_fuzz::alloc::Capped;

libfuzzer_sys::fuzz_target!(|data: &[u8]| flamingo_fuzz::request::run(data));
