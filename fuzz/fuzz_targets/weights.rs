//! `cargo fuzz run --features libfuzzer weights`: see `flamingo_fuzz::weights`.
#![no_main]

#[global_allocator]
static ALLOC: flamingo_fuzz::alloc::Capped = flamingo_fuzz::alloc::Capped;

libfuzzer_sys::fuzz_target!(|data: &[u8]| flamingo_fuzz::weights::run(data));
