//! `cargo fuzz run --features libfuzzer prompt`: see `flamingo_fuzz::prompt`.
#![no_main]

#[global_allocator]
static ALLOC: flamingo_fuzz::alloc::Capped = flamingo_fuzz::alloc::Capped;

libfuzzer_sys::fuzz_target!(|data: &[u8]| flamingo_fuzz::prompt::run(data));
