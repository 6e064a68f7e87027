//! `cargo fuzz run --features libfuzzer model_dir`: see `flamingo_fuzz::model_dir`.
#![no_main]

#[global_allocator]
static ALLOC: flamingo_fuzz::alloc::Capped = flamingo_fuzz::alloc::Capped;

libfuzzer_sys::fuzz_target!(|data: &[u8]| flamingo_fuzz::model_dir::run(data));
