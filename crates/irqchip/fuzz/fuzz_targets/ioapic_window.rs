#![no_main]
// The body and its invariants: irqchip_fuzz::devices::ioapic (docs/fuzzing.md).
libfuzzer_sys::fuzz_target!(|data: &[u8]| irqchip_fuzz::devices::ioapic(data));
