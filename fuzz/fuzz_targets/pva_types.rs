#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nameshim_fuzz::pva_types(data));
