//! The guest tests' expectation files (guests/expect) and the comparison of a run with them
//! (`common::expect`), without KVM: every guest has a file that parses, and each kind of
//! difference (SKIP or FAIL instead of PASS, a missing, unknown or repeated check, a stale
//! host-limit tolerance, a DONE line that disagrees) is reported.

mod common;

use common::expect::{all_guests, printed_checks, Expectations, Seen, Vendor, EXPECT_DIR};
use irqvm::IrqchipMode::{Kernel, Split, User};

/// An expectation file in the real format, with every outcome.
const FILE: &str = "\
# comment
#cpus  user  split kernel check
1,2,4  pass  pass  pass   always passes
1      skip  skip  skip   needs two cpus
2,4    pass  pass  pass   needs two cpus
1,2,4  pass  fail  fail   host limit [isr-kept]
1,2,4  pass  flaky flaky  timing-dependent host limit
";

fn expectations() -> Expectations {
    Expectations::parse("example", FILE).unwrap()
}

/// A run's output: `checks` then a DONE line that counts them.
fn output(checks: &[&str]) -> String {
    let passed = checks.iter().filter(|c| c.starts_with("PASS: ")).count();
    let failed = checks.iter().filter(|c| c.starts_with("FAIL: ")).count();
    let mut text = String::from("INFO: hello\n");
    for c in checks {
        text.push_str(c);
        text.push('\n');
    }
    text.push_str(&format!("DONE: {passed} passed, {failed} failed\n"));
    text
}

fn problems(mode: irqvm::IrqchipMode, cpus: u32, checks: &[&str]) -> String {
    expectations()
        .verify(mode, cpus, &output(checks))
        .expect_err("the run differs")
}

const USER_2: &[&str] = &[
    "PASS: always passes",
    "PASS: needs two cpus",
    "PASS: host limit [isr-kept]",
    "PASS: timing-dependent host limit",
];

#[test]
fn the_expected_run_passes_and_reports_the_host_limits_it_met() {
    let e = expectations();
    assert_eq!(e.cpu_counts(), [1, 2, 4]);
    assert!(e
        .verify(User, 2, &output(USER_2))
        .unwrap()
        .tolerated
        .is_empty());
    let split = [
        "PASS: always passes",
        "SKIP: needs two cpus: only 1 CPU",
        "FAIL: host limit [isr-kept]: 2 interrupts",
        "FAIL: timing-dependent host limit: late",
    ];
    let verdict = e.verify(Split, 1, &output(&split)).unwrap();
    assert_eq!(
        verdict.tolerated,
        [
            "host limit [isr-kept]: 2 interrupts",
            "timing-dependent host limit: late"
        ]
    );
    let kernel = [
        "PASS: always passes",
        "PASS: needs two cpus",
        "FAIL: host limit [isr-kept]: 2 interrupts",
        "PASS: timing-dependent host limit",
    ];
    e.verify(Kernel, 4, &output(&kernel)).unwrap();
}

#[test]
fn a_skip_where_a_pass_is_expected_fails() {
    let mut run = USER_2.to_vec();
    run[0] = "SKIP: always passes: CPUID.1:ECX[21] is clear";
    let p = problems(User, 2, &run);
    assert!(
        p.contains("SKIP \"always passes\": CPUID.1:ECX[21] is clear (expected Pass)"),
        "{p}"
    );
}

#[test]
fn a_guest_that_skips_its_whole_body_fails_with_every_missing_check() {
    let p = problems(User, 4, &["SKIP: x2apic: CPUID.1:ECX[21] is clear"]);
    assert!(p.contains("unexpected check SKIP \"x2apic\""), "{p}");
    for name in ["always passes", "needs two cpus", "host limit [isr-kept]"] {
        assert!(p.contains(&format!("missing check {name:?}")), "{p}");
    }
}

#[test]
fn an_unexpected_failure_fails_even_with_a_host_limit_tag() {
    let mut run = USER_2.to_vec();
    run[2] = "FAIL: host limit [isr-kept]: ISR 0";
    let p = problems(User, 2, &run);
    assert!(
        p.contains("FAIL \"host limit [isr-kept]\": ISR 0 (expected Pass)"),
        "{p}"
    );
}

#[test]
fn a_tolerated_failure_that_passes_is_a_stale_tolerance() {
    let run = [
        "PASS: always passes",
        "PASS: needs two cpus",
        "PASS: host limit [isr-kept]",
        "FAIL: timing-dependent host limit: late",
    ];
    let p = problems(Kernel, 2, &run);
    assert!(p.contains("\"host limit [isr-kept]\" PASSES"), "{p}");
    assert!(p.contains("the tolerance is stale"), "{p}");
}

#[test]
fn a_flaky_check_may_not_skip() {
    let mut run = USER_2.to_vec();
    run[3] = "SKIP: timing-dependent host limit: no";
    assert!(problems(Split, 2, &run).contains("(expected Flaky)"));
}

/// Checks tagged `[amd]` or `[intel]` are expected only on a host of that vendor: on the other
/// they are unexpected, and where they apply their absence is a missing check.
#[test]
fn vendor_tagged_checks_apply_on_their_vendor_only() {
    let file = "\
1      pass  pass  pass   everywhere
1      pass  pass  pass   the amd way [amd]
1      pass  fail  fail   the intel way [intel] [some-limit]
";
    let e = Expectations::parse("vendors", file).unwrap();
    let amd = output(&["PASS: everywhere", "PASS: the amd way [amd]"]);
    let intel = output(&[
        "PASS: everywhere",
        "FAIL: the intel way [intel] [some-limit]: no",
    ]);
    assert!(e.verify_on(User, 1, &amd, Vendor::Amd).is_ok());
    assert!(e.verify_on(Kernel, 1, &intel, Vendor::Intel).is_ok());
    let p = e.verify_on(User, 1, &amd, Vendor::Intel).unwrap_err();
    assert!(
        p.contains("unexpected check PASS \"the amd way [amd]\""),
        "{p}"
    );
    assert!(
        p.contains("missing check \"the intel way [intel] [some-limit]\""),
        "{p}"
    );
    let p = e.verify_on(User, 1, &output(&["PASS: everywhere"]), Vendor::Other);
    assert!(p.is_ok(), "neither applies on another vendor: {p:?}");
}

#[test]
fn unknown_and_repeated_checks_fail() {
    let mut run = USER_2.to_vec();
    run.push("PASS: a new check");
    run.push("PASS: always passes");
    let p = problems(User, 2, &run);
    assert!(p.contains("unexpected check PASS \"a new check\""), "{p}");
    assert!(p.contains("\"always passes\" printed 2 times"), "{p}");
}

#[test]
fn the_done_line_must_count_the_check_lines() {
    let mut text = output(USER_2);
    text = text.replace("DONE: 4 passed", "DONE: 5 passed");
    let p = expectations().verify(User, 2, &text).unwrap_err();
    assert!(p.contains("DONE says 5 passed, 0 failed"), "{p}");
    let p = expectations()
        .verify(User, 2, &text.replace("DONE", "D0NE"))
        .unwrap_err();
    assert!(p.contains("no DONE line"), "{p}");
}

#[test]
fn a_vcpu_count_the_file_does_not_name_fails() {
    let p = problems(User, 3, &[]);
    assert!(p.contains("lists no check for 3 vCPU(s)"), "{p}");
}

#[test]
fn fail_and_skip_lines_name_the_check_before_the_first_colon() {
    let checks = printed_checks("FAIL: a b [t]: x: y\nSKIP: c: d\nPASS: e f\nINFO: g: h\n");
    let got: Vec<(Seen, &str, &str)> = checks
        .iter()
        .map(|p| (p.seen, p.name.as_str(), p.detail.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (Seen::Fail, "a b [t]", "x: y"),
            (Seen::Skip, "c", "d"),
            (Seen::Pass, "e f", "")
        ]
    );
}

#[test]
fn malformed_files_are_refused() {
    let bad = [
        ("1,2,4 pass pass\n", "expected: CPUS"),
        ("1,x pass pass pass a\n", "vCPU counts"),
        ("1 pass maybe pass a\n", "an outcome is"),
        ("1 pass pass pass a: b\n", "no colon"),
        ("1,2 pass pass pass a\n2 pass pass pass a\n", "listed twice"),
        ("1 skip pass pass a\n", "no check must pass in User mode"),
        (
            "1 pass - pass a\n1 pass pass pass b\n",
            "a column is all `-`",
        ),
        ("1 - pass pass a\n", "a column is all `-`"),
    ];
    for (text, why) in bad {
        let e = Expectations::parse("bad", text).unwrap_err();
        assert!(e.contains(why), "{text:?}: {e}");
    }
}

/// `-` in a whole column: the guest is not run in that mode (only `user` mode runs every
/// guest); a run in that mode is reported as one.
#[test]
fn a_dash_column_means_not_run_in_that_mode() {
    let e = Expectations::parse("user_only", "1,2 pass - - a\n2 pass - - b\n").unwrap();
    assert!(e.runs_in(User) && !e.runs_in(Split) && !e.runs_in(Kernel));
    assert_eq!(e.cpu_counts(), [1, 2]);
    e.verify(User, 2, &output(&["PASS: a", "PASS: b"])).unwrap();
    let p = e
        .verify(Split, 2, &output(&["PASS: a", "PASS: b"]))
        .unwrap_err();
    assert!(p.contains("not run in Split mode"), "{p}");
}

/// Every guest has an expectation file, every file belongs to a guest, and each parses.
#[test]
fn every_guest_has_an_expectation_file_that_parses() {
    let guests = all_guests();
    assert!(guests.len() >= 16, "{guests:?}");
    for guest in &guests {
        assert!(
            !Expectations::load(guest).cpu_counts().is_empty(),
            "{guest}"
        );
    }
    for entry in std::fs::read_dir(EXPECT_DIR).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let stem = name.strip_suffix(".txt").unwrap_or(&name);
        assert!(
            guests.iter().any(|g| g == stem),
            "{EXPECT_DIR}/{name} belongs to no guest"
        );
    }
}
