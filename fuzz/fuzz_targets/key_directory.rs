#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fumi_fuzz::targets::key_directory(data));
