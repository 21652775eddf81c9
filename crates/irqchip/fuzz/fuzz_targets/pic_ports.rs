#![no_main]
// The body and its invariants: irqchip_fuzz::devices::pic (docs/fuzzing.md).
libfuzzer_sys::fuzz_target!(|data: &[u8]| irqchip_fuzz::devices::pic(data));
