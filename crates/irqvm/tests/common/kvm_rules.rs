//! The checks the guests `apic_base_rsvd`, `timer_mode` and `nmi_queue` print, and which of them
//! must PASS (not merely not fail) on `cpus` vCPUs. Included by the `guests_*` tests with
//! `#[path]`; the three behaviours follow KVM in every irqchip mode (issue 10, section 1).
#![allow(dead_code)]

/// The PASS lines `guest` must print on `cpus` vCPUs. `apic_base_rsvd`'s bit-51 checks are SKIP
/// (not required) when the guest's MAXPHYADDR is 52, so they are required only if the output
/// says otherwise.
pub fn required_passes(guest: &str, cpus: u32, output: &str) -> Vec<String> {
    let mut checks: Vec<String> = match guest {
        "apic_base_rsvd" => {
            let mut c = vec!["all cpus online".to_string()];
            let on = if cpus >= 2 { 0..2 } else { 0..1 };
            for cpu in on {
                c.push(format!("base bit at maxphyaddr raises gp on cpu {cpu}"));
                if !output.contains("INFO: MAXPHYADDR 52,") {
                    c.push(format!("base bit 51 raises gp on cpu {cpu}"));
                }
                c.push(format!("reserved low bits raise gp on cpu {cpu}"));
                c.push(format!(
                    "highest base bit below maxphyaddr is accepted on cpu {cpu}"
                ));
            }
            c.push("apic page answers at FEE00000 afterwards".to_string());
            c
        }
        "timer_mode" => [
            "initial count reads back unchanged after one-shot to periodic",
            "current count keeps counting down after one-shot to periodic",
            "periodic reloads from the initial count after the switch",
            "initial count reads back unchanged after periodic to one-shot",
            "current count keeps counting down after periodic to one-shot",
            "the count in progress ends once after periodic to one-shot",
            "expired one-shot stays at zero after a switch to periodic",
            "switch to tsc-deadline stops the count and clears the initial count",
            "switch from tsc-deadline disarms the deadline",
        ]
        .map(String::from)
        .to_vec(),
        "nmi_queue" => {
            let mut c: Vec<String> = [
                "all cpus online",
                "nmis sent while one is in service: one is held and the rest coalesce",
                "no nmi nests inside the nmi handler",
                "no nmi reaches another cpu",
            ]
            .map(String::from)
            .to_vec();
            if cpus >= 2 {
                c.push("two nmis sent back to back are both taken".to_string());
            }
            if cpus >= 3 {
                c.push(
                    "two cpus sending an nmi at the same moment: cpu 0 takes exactly two"
                        .to_string(),
                );
            }
            c
        }
        other => panic!("no required checks for guest {other}"),
    };
    checks.iter_mut().for_each(|c| *c = format!("PASS: {c}"));
    checks
}

/// Every required check of `guest` on `cpus` vCPUs printed PASS.
pub fn assert_required_passes(guest: &str, cpus: u32, output: &str) {
    let missing: Vec<String> = required_passes(guest, cpus, output)
        .into_iter()
        .filter(|line| !output.lines().any(|l| l == line))
        .collect();
    assert!(
        missing.is_empty(),
        "{guest} on {cpus} vCPU(s): missing {missing:?}\n{output}"
    );
}
