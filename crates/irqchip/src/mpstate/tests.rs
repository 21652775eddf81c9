//! Tests of the MP state machine (seeds 000, 002, 004; SDM vol. 3 §9.4) and of the reset table
//! (SDM vol. 3A §10.1.1, Table 10-1).

use super::*;
use proptest::prelude::*;

const INIT: ApicEvents = ApicEvents {
    init: true,
    sipi: None,
    nmi: false,
    smi: false,
    extint: false,
};

fn sipi(vector: Vector) -> ApicEvents {
    ApicEvents {
        sipi: Some(vector),
        ..ApicEvents::default()
    }
}

fn accept(m: &mut MpStateMachine) -> AcceptOutcome {
    m.accept_events(InitBlocking::NONE, &mut StandardSipi)
}

const SMM: InitBlocking = InitBlocking {
    smm: true,
    vmx_root: false,
    gif_clear: false,
};

/// Puts a fresh machine into `state` through events only (no set_from_user).
fn machine_in(state: MpState, bsp: bool) -> MpStateMachine {
    let mut m = MpStateMachine::new(bsp);
    if !bsp {
        m.latch(INIT);
        m.latch(sipi(0x10));
        accept(&mut m);
    }
    match state {
        MpState::Runnable => {}
        MpState::Halted => m.halt(),
        MpState::ApResetHold => m.ap_reset_hold(),
        MpState::InitReceived => {
            assert!(!bsp, "a BSP never waits for SIPI");
            m.latch(INIT);
            accept(&mut m);
        }
        MpState::Uninitialized => {
            assert!(!bsp);
            m = MpStateMachine::new(false);
        }
    }
    assert_eq!(m.state(), state);
    m
}

// ---- power-up state (SDM §9.4.1; seed 000) ----

#[test]
fn power_up_bsp_runnable_ap_uninitialized_sdm_9_4_1() {
    assert_eq!(MpStateMachine::new(true).state(), MpState::Runnable);
    assert_eq!(MpStateMachine::new(false).state(), MpState::Uninitialized);
    assert!(!MpStateMachine::new(false).has_pending_init_or_sipi());
}

// ---- HLT / wake / AP reset hold transitions ----

#[test]
fn halt_moves_runnable_to_halted_and_wake_back() {
    let mut m = MpStateMachine::new(true);
    m.halt();
    assert_eq!(m.state(), MpState::Halted);
    m.halt();
    assert_eq!(m.state(), MpState::Halted, "HLT while halted is idempotent");
    m.wake();
    assert_eq!(m.state(), MpState::Runnable);
    m.wake();
    assert_eq!(
        m.state(),
        MpState::Runnable,
        "wake of a running vCPU is a no-op"
    );
}

#[test]
fn halt_wake_and_hold_ignored_in_non_running_states() {
    for state in [
        MpState::Uninitialized,
        MpState::InitReceived,
        MpState::ApResetHold,
    ] {
        let mut m = machine_in(state, false);
        m.halt();
        m.wake();
        m.ap_reset_hold();
        assert_eq!(m.state(), state, "{state:?} only leaves through INIT/SIPI");
    }
    let mut m = machine_in(MpState::Halted, false);
    m.ap_reset_hold();
    assert_eq!(
        m.state(),
        MpState::Halted,
        "a halted vCPU cannot request a hold"
    );
}

#[test]
fn ap_reset_hold_parks_runnable_seed_004() {
    let mut m = machine_in(MpState::Runnable, false);
    m.ap_reset_hold();
    assert_eq!(m.state(), MpState::ApResetHold);
    m.wake();
    assert_eq!(
        m.state(),
        MpState::ApResetHold,
        "interrupts do not end the hold"
    );
}

// ---- INIT (seed 000) ----

#[test]
fn init_on_ap_enters_wait_for_sipi_from_every_state_seed_000() {
    for state in MpState::ALL {
        let mut m = machine_in(state, false);
        m.latch(INIT);
        let out = accept(&mut m);
        assert_eq!(
            out.reset,
            Some(ResetKind::Init {
                write_registers: true
            }),
            "from {state:?}"
        );
        assert_eq!(out.start, None);
        assert_eq!(m.state(), MpState::InitReceived, "from {state:?}");
        assert!(!m.has_pending_init_or_sipi());
    }
}

#[test]
fn init_on_bsp_restarts_it_runnable_without_sipi_seed_000() {
    for state in [MpState::Runnable, MpState::Halted, MpState::ApResetHold] {
        let mut m = machine_in(state, true);
        m.latch(INIT);
        let out = accept(&mut m);
        assert!(out.reset.is_some());
        assert_eq!(out.start, None);
        assert_eq!(m.state(), MpState::Runnable, "BSP from {state:?}");
    }
}

#[test]
fn bsp_ignores_sipi_after_its_init_seed_000() {
    let mut m = MpStateMachine::new(true);
    m.latch(INIT);
    m.latch(sipi(0x20));
    let out = accept(&mut m);
    assert!(out.reset.is_some());
    assert_eq!(
        out.start, None,
        "the BSP restarts at the reset vector, not at the SIPI"
    );
    assert!(out.dropped_sipi);
    assert_eq!(m.state(), MpState::Runnable);
}

/// INIT decides between restart and wait-for-SIPI by the IA32_APIC_BASE.BSP flag it is given
/// (the guest may write it; KVM `kvm_vcpu_is_bsp`), not by the power-up role: the configured
/// BSP with its flag clear waits for a SIPI and starts at it; an AP with the flag set restarts.
#[test]
fn init_follows_the_bsp_flag_at_the_init_not_the_power_up_role() {
    for state in [MpState::Runnable, MpState::Halted] {
        let mut bsp = machine_in(state, true);
        bsp.latch(INIT);
        let out = bsp.accept_events_with_bsp_flag(InitBlocking::NONE, false, &mut StandardSipi);
        assert!(out.reset.is_some());
        assert_eq!(
            bsp.state(),
            MpState::InitReceived,
            "BSP, flag clear, from {state:?}"
        );
        bsp.latch(sipi(0x10));
        let out = bsp.accept_events_with_bsp_flag(InitBlocking::NONE, false, &mut StandardSipi);
        assert!(out.start.is_some(), "the SIPI starts the former BSP");
        assert_eq!(bsp.state(), MpState::Runnable);
        assert!(bsp.is_bsp(), "the configured role does not change");

        let mut ap = machine_in(state, false);
        ap.latch(INIT);
        ap.latch(sipi(0x10));
        let out = ap.accept_events_with_bsp_flag(InitBlocking::NONE, true, &mut StandardSipi);
        assert!(out.reset.is_some());
        assert_eq!(
            out.start, None,
            "AP, flag set, from {state:?}: reset vector"
        );
        assert!(out.dropped_sipi);
        assert_eq!(ap.state(), MpState::Runnable);
    }
}

#[test]
fn reset_kind_carries_arch_state_only_when_registers_writable() {
    let writable = ResetKind::Init {
        write_registers: true,
    };
    assert_eq!(
        writable.arch_state(0x806),
        Some(ArchResetState::after_init(0x806))
    );
    let protected = ResetKind::Init {
        write_registers: false,
    };
    assert_eq!(protected.arch_state(0x806), None);
}

// ---- SIPI (SDM §9.4.3, §11.6.1) ----

#[test]
fn sipi_in_wait_for_sipi_starts_real_mode_at_vector_sdm_9_4_3() {
    let mut m = machine_in(MpState::InitReceived, false);
    m.latch(sipi(0x9A));
    let out = accept(&mut m);
    assert_eq!(
        out.start,
        Some(SipiAction::StartRealMode {
            cs_selector: 0x9A00,
            cs_base: 0x9_A000,
            rip: 0
        })
    );
    assert_eq!(out.reset, None);
    assert!(!out.dropped_sipi);
    assert_eq!(m.state(), MpState::Runnable);
}

#[test]
fn sipi_vector_extremes_do_not_overflow_sdm_11_6_1() {
    assert_eq!(
        SipiAction::real_mode(0xFF),
        SipiAction::StartRealMode {
            cs_selector: 0xFF00,
            cs_base: 0xF_F000,
            rip: 0
        }
    );
    assert_eq!(
        SipiAction::real_mode(0),
        SipiAction::StartRealMode {
            cs_selector: 0,
            cs_base: 0,
            rip: 0
        }
    );
}

#[test]
fn sipi_outside_wait_for_sipi_is_dropped_sdm_9_4_2() {
    for (state, bsp) in [
        (MpState::Runnable, false),
        (MpState::Runnable, true),
        (MpState::Halted, false),
        (MpState::Halted, true),
        (MpState::Uninitialized, false),
        (MpState::ApResetHold, false),
    ] {
        let mut m = machine_in(state, bsp);
        m.latch(sipi(0x30));
        assert!(m.has_pending_init_or_sipi());
        let out = accept(&mut m);
        assert_eq!(out.start, None, "{state:?}");
        assert_eq!(out.reset, None);
        assert!(out.dropped_sipi, "{state:?}");
        assert_eq!(m.state(), state, "a dropped SIPI changes nothing");
        assert!(!m.has_pending_init_or_sipi());
    }
}

#[test]
fn init_sipi_sipi_starts_exactly_once_sdm_9_4_4() {
    let mut m = MpStateMachine::new(false);
    let mut starts = 0;
    for events in [INIT, sipi(0x08), sipi(0x08)] {
        m.latch(events);
        starts += usize::from(accept(&mut m).start.is_some());
    }
    assert_eq!(starts, 1);
    assert_eq!(m.state(), MpState::Runnable);
}

#[test]
fn init_sipi_sipi_latched_together_starts_once_with_latest_vector() {
    let mut m = MpStateMachine::new(false);
    m.latch(INIT);
    m.latch(sipi(0x08));
    m.latch(sipi(0x09));
    let out = accept(&mut m);
    assert!(out.reset.is_some());
    assert_eq!(out.start, Some(SipiAction::real_mode(0x09)));
    assert!(!out.dropped_sipi);
    assert_eq!(accept(&mut m), AcceptOutcome::default());
}

#[test]
fn init_and_sipi_in_one_batch_init_first_then_start_kvm_accept_events() {
    // KVM kvm_apic_accept_events: INIT bit, then SIPI bit of the same snapshot; the SIPI finds
    // the AP in INIT_RECEIVED and starts it in the same step.
    let mut m = machine_in(MpState::Runnable, false);
    m.latch(ApicEvents {
        init: true,
        sipi: Some(0x42),
        ..ApicEvents::default()
    });
    let out = accept(&mut m);
    assert!(out.reset.is_some());
    assert_eq!(out.start, Some(SipiAction::real_mode(0x42)));
    assert_eq!(m.state(), MpState::Runnable);
}

#[test]
fn init_discards_sipi_latched_before_it_kvm_apic_accept_irq() {
    let mut m = machine_in(MpState::InitReceived, false);
    m.latch(sipi(0x11));
    m.latch(INIT);
    assert_eq!(m.pending_events(), INIT);
    let out = accept(&mut m);
    assert!(out.reset.is_some());
    assert_eq!(
        out.start, None,
        "the older SIPI must not start the re-INITed AP"
    );
    assert_eq!(m.state(), MpState::InitReceived);
}

#[test]
fn latch_ignores_nmi_smi_extint() {
    let mut m = MpStateMachine::new(false);
    m.latch(ApicEvents {
        nmi: true,
        smi: true,
        extint: true,
        ..ApicEvents::default()
    });
    assert!(!m.has_pending_init_or_sipi());
}

// ---- INIT racing HLT (seed 000) ----

#[test]
fn init_latched_then_halt_is_accepted_next_step_seed_000() {
    let mut m = machine_in(MpState::Runnable, false);
    m.latch(INIT); // posted by another vCPU just before this one executes HLT
    m.halt();
    assert_eq!(m.state(), MpState::Halted);
    assert!(
        m.has_pending_init_or_sipi(),
        "HLT must not discard the INIT"
    );
    assert!(
        m.needs_accept(InitBlocking::NONE),
        "the loop must not block"
    );
    let out = accept(&mut m);
    assert!(out.reset.is_some());
    assert_eq!(m.state(), MpState::InitReceived);
}

#[test]
fn sipi_to_halted_vcpu_does_not_wake_it_sdm_hlt() {
    let mut m = machine_in(MpState::Halted, false);
    m.latch(sipi(0x10));
    accept(&mut m);
    assert_eq!(m.state(), MpState::Halted);
    assert!(!MpState::Halted.is_woken_by(WakeEvent::Sipi));
}

// ---- INIT blocking (seed 002) ----

#[test]
fn blocked_init_stays_latched_and_sipi_is_dropped_seed_002() {
    for blocking in [
        SMM,
        InitBlocking {
            vmx_root: true,
            ..InitBlocking::NONE
        },
        InitBlocking {
            gif_clear: true,
            ..InitBlocking::NONE
        },
    ] {
        let mut m = machine_in(MpState::Runnable, false);
        m.latch(ApicEvents {
            init: true,
            sipi: Some(0x50),
            ..ApicEvents::default()
        });
        let out = m.accept_events(blocking, &mut StandardSipi);
        assert_eq!(out.reset, None, "{blocking:?}");
        assert_eq!(out.start, None);
        assert!(out.dropped_sipi);
        assert!(out.init_blocked);
        assert_eq!(m.state(), MpState::Runnable);
        assert_eq!(m.pending_events(), INIT);
        assert!(
            !m.needs_accept(blocking),
            "a blocked INIT must not make the loop spin"
        );
        assert!(m.needs_accept(InitBlocking::NONE));

        // Unblocked (e.g. RSM): the INIT is processed; the dropped SIPI stays dropped.
        let out = accept(&mut m);
        assert!(out.reset.is_some());
        assert_eq!(out.start, None);
        assert_eq!(m.state(), MpState::InitReceived);
    }
}

#[test]
fn blocked_step_without_events_reports_nothing_seed_002() {
    let mut m = machine_in(MpState::Halted, false);
    assert_eq!(
        m.accept_events(SMM, &mut StandardSipi),
        AcceptOutcome::default()
    );
    assert_eq!(m.state(), MpState::Halted);
}

// ---- KVM_SET_MP_STATE (seed 000) ----

#[test]
fn set_from_user_sipi_received_means_init_received_plus_sipi_seed_000() {
    let mut m = MpStateMachine::new(false);
    m.latch(INIT);
    m.latch(sipi(0x77));
    accept(&mut m); // remembers 0x77 as the last SIPI vector
    m.set_from_user(kvm_abi::SIPI_RECEIVED, InitBlocking::NONE)
        .unwrap();
    assert_eq!(m.state(), MpState::InitReceived);
    assert_eq!(m.pending_events(), sipi(0x77));
    assert_eq!(
        m.get_for_user(),
        kvm_abi::INIT_RECEIVED,
        "SIPI_RECEIVED is never reported"
    );
    let out = accept(&mut m);
    assert_eq!(out.start, Some(SipiAction::real_mode(0x77)));
    assert_eq!(m.state(), MpState::Runnable);
}

#[test]
fn set_from_user_plain_states_round_trip() {
    for state in MpState::ALL {
        let mut m = MpStateMachine::new(false);
        m.set_from_user(state.to_kvm(), InitBlocking::NONE).unwrap();
        assert_eq!(m.state(), state);
        assert_eq!(m.get_for_user(), state.to_kvm());
        assert!(!m.has_pending_init_or_sipi());
    }
}

#[test]
fn set_from_user_refuses_wait_for_sipi_while_init_blocked() {
    let mut m = MpStateMachine::new(false);
    for value in [kvm_abi::INIT_RECEIVED, kvm_abi::SIPI_RECEIVED] {
        assert_eq!(m.set_from_user(value, SMM), Err(MpStateError::InitBlocked));
        assert_eq!(m.state(), MpState::Uninitialized);
        assert!(!m.has_pending_init_or_sipi());
    }
    assert_eq!(m.set_from_user(kvm_abi::HALTED, SMM), Ok(()));
}

#[test]
fn set_from_user_refuses_unknown_values() {
    let mut m = MpStateMachine::new(true);
    for value in [5, 6, 7, 8, 10, 11, u32::MAX] {
        assert_eq!(
            m.set_from_user(value, InitBlocking::NONE),
            Err(MpStateError::Unsupported(value))
        );
        assert_eq!(m.state(), MpState::Runnable);
    }
}

#[test]
fn set_from_user_keeps_a_latched_init() {
    let mut m = machine_in(MpState::Runnable, false);
    m.latch(INIT);
    m.set_from_user(kvm_abi::HALTED, InitBlocking::NONE)
        .unwrap();
    assert_eq!(m.pending_events(), INIT);
}

// ---- protected guest state (seed 004) ----

#[test]
fn protected_first_boot_runs_untouched_seed_004() {
    let mut m = MpStateMachine::new(false);
    let mut plug = ProtectedStateSipi::new();
    m.latch(INIT);
    let out = m.accept_events(InitBlocking::NONE, &mut plug);
    assert_eq!(
        out.reset,
        Some(ResetKind::Init {
            write_registers: false
        })
    );
    m.latch(sipi(0x10));
    let out = m.accept_events(InitBlocking::NONE, &mut plug);
    assert_eq!(
        out.start,
        Some(SipiAction::ResumeUntouched { first_boot: true })
    );
    assert!(plug.has_booted());
    assert_eq!(m.state(), MpState::Runnable);
}

#[test]
fn protected_reset_hold_then_init_sipi_sipi_resumes_once_seed_004() {
    let mut m = MpStateMachine::new(false);
    let mut plug = ProtectedStateSipi::new();
    for events in [INIT, sipi(0x10), sipi(0x10)] {
        m.latch(events);
        m.accept_events(InitBlocking::NONE, &mut plug);
    }
    m.ap_reset_hold();
    assert_eq!(m.state(), MpState::ApResetHold);
    assert!(!m.state().is_woken_by(WakeEvent::Interrupt));
    assert!(!m.state().is_woken_by(WakeEvent::Nmi));

    m.latch(sipi(0x10));
    let out = m.accept_events(InitBlocking::NONE, &mut plug);
    assert!(
        out.dropped_sipi,
        "a SIPI without INIT does not end the hold"
    );
    assert_eq!(m.state(), MpState::ApResetHold);

    let mut starts = Vec::new();
    let mut resets = Vec::new();
    for events in [INIT, sipi(0x10), sipi(0x10)] {
        m.latch(events);
        let out = m.accept_events(InitBlocking::NONE, &mut plug);
        starts.extend(out.start);
        resets.extend(out.reset);
    }
    assert_eq!(
        resets,
        [ResetKind::Init {
            write_registers: false
        }]
    );
    assert_eq!(starts, [SipiAction::ResumeUntouched { first_boot: false }]);
    assert_eq!(m.state(), MpState::Runnable);
}

#[test]
fn protected_start_leaves_loaded_state_alone() {
    let mut regs = ArchResetState::after_init(DEFAULT_PROCESSOR_SIGNATURE);
    let before = regs;
    regs.apply_start(&SipiAction::ResumeUntouched { first_boot: false });
    assert_eq!(regs, before);
}

// ---- wake rules (SDM vol. 2 HLT; SDM vol. 3 wait-for-SIPI) ----

#[test]
fn wake_rules_per_state() {
    use WakeEvent::*;
    let all = [Interrupt, Nmi, Smi, Init, Sipi];
    let woken = |state: MpState| -> Vec<WakeEvent> {
        all.into_iter().filter(|e| state.is_woken_by(*e)).collect()
    };
    assert_eq!(woken(MpState::Runnable), all);
    assert_eq!(woken(MpState::Halted), [Interrupt, Nmi, Smi, Init]);
    assert_eq!(woken(MpState::InitReceived), [Init, Sipi]);
    assert_eq!(woken(MpState::Uninitialized), [Init]);
    assert_eq!(woken(MpState::ApResetHold), [Init]);
}

#[test]
fn transition_table_matches_documented_edges() {
    use MpState::*;
    let allowed = |from, to, bsp| MpState::transition_allowed(from, to, bsp);
    for bsp in [false, true] {
        for s in MpState::ALL {
            assert!(allowed(s, s, bsp));
            assert!(!allowed(s, Uninitialized, bsp) || s == Uninitialized);
        }
        assert!(allowed(Runnable, Halted, bsp));
        assert!(allowed(Runnable, ApResetHold, bsp));
        assert!(allowed(Halted, Runnable, bsp));
        assert!(allowed(InitReceived, Runnable, bsp));
        assert!(!allowed(Halted, ApResetHold, bsp));
        assert!(!allowed(ApResetHold, Halted, bsp));
        assert!(!allowed(Uninitialized, Halted, bsp));
    }
    assert!(allowed(Halted, InitReceived, false));
    assert!(!allowed(Halted, InitReceived, true));
    assert!(
        !allowed(Uninitialized, Runnable, false),
        "an AP needs a SIPI"
    );
    assert!(
        allowed(ApResetHold, Runnable, true),
        "INIT restarts the BSP"
    );
    assert!(!allowed(ApResetHold, Runnable, false));
}

#[test]
fn machine_serde_round_trip_keeps_latch() {
    let mut m = machine_in(MpState::Halted, false);
    m.latch(INIT);
    m.latch(sipi(0x12));
    let json = serde_json::to_string(&m).unwrap();
    let back: MpStateMachine = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
}

// ---- reset table (SDM vol. 3A §10.1.1, Table 10-1) ----

#[test]
fn table_10_1_common_registers() {
    for s in [
        ArchResetState::power_up(0x0006_06A5),
        ArchResetState::after_init(0x0006_06A5),
    ] {
        assert_eq!(s.rflags, 0x2);
        assert_eq!(s.rip, 0xFFF0);
        assert_eq!(s.cs.selector, 0xF000);
        assert_eq!(s.cs.base, 0xFFFF_0000);
        assert_eq!(s.cs.limit, 0xFFFF);
        assert_eq!(s.cs.access_rights, 0x9B);
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!(seg, SegmentState::RESET_DATA);
            assert_eq!((seg.selector, seg.base, seg.limit), (0, 0, 0xFFFF));
            assert_eq!(seg.access_rights, 0x93);
        }
        for table in [s.gdtr, s.idtr] {
            assert_eq!((table.base, table.limit), (0, 0xFFFF));
        }
        assert_eq!((s.ldtr.selector, s.ldtr.base, s.ldtr.limit), (0, 0, 0xFFFF));
        assert_eq!((s.tr.selector, s.tr.base, s.tr.limit), (0, 0, 0xFFFF));
        assert_eq!((s.cr2, s.cr3, s.cr4, s.efer), (0, 0, 0, 0));
        assert_eq!(s.cr0, 0x6000_0010);
        assert_eq!(s.dr0_3, [0; 4]);
        assert_eq!(s.dr6, 0xFFFF_0FF0);
        assert_eq!(s.dr7, 0x400);
        assert_eq!(s.gprs[gpr::RDX], 0x0006_06A5, "EDX = processor signature");
        for (i, value) in s.gprs.iter().enumerate() {
            if i != gpr::RDX {
                assert_eq!(*value, 0, "GPR {i}");
            }
        }
    }
}

#[test]
fn table_10_1_power_up_column() {
    let s = ArchResetState::power_up(DEFAULT_PROCESSOR_SIGNATURE);
    assert_eq!(s.cause, ResetCause::PowerUp);
    assert_eq!(
        s.cr0_from(0xFFFF_FFFF),
        0x6000_0010,
        "old CR0 is irrelevant"
    );
    assert_eq!(s.xcr0, Some(1));
    assert_eq!(s.pat, Some(0x0007_0406_0007_0406));
    assert_eq!(s.tsc, Some(0));
    assert_eq!(s.smbase, Some(0x3_0000));
    assert_eq!(s.mtrr_def_type, Some(0), "MTRRs disabled");
    let fpu = s.fpu.unwrap();
    assert_eq!(
        (fpu.fcw, fpu.fsw, fpu.ftw, fpu.mxcsr),
        (0x40, 0, 0x5555, 0x1F80)
    );
    assert!(s.preserved().is_empty());
}

#[test]
fn table_10_1_init_column_keeps_cd_nw_and_state() {
    let s = ArchResetState::after_init(DEFAULT_PROCESSOR_SIGNATURE);
    assert_eq!(s.cause, ResetCause::Init);
    // Note 2: CD and NW unchanged, ET set, all other bits cleared.
    assert_eq!(
        s.cr0_from(0x8000_0011),
        0x10,
        "PG, PE cleared; CD/NW were clear"
    );
    assert_eq!(s.cr0_from(0xE005_003B), 0x6000_0010);
    assert_eq!(s.cr0_from(CR0_CD | 1), CR0_CD | CR0_ET);
    assert_eq!(
        (s.xcr0, s.pat, s.tsc, s.smbase, s.mtrr_def_type, s.fpu),
        (None, None, None, None, None, None)
    );
    for kept in [
        PreservedState::Mtrrs,
        PreservedState::Smbase,
        PreservedState::X87,
        PreservedState::SseAvx,
        PreservedState::Tsc,
        PreservedState::Pat,
        PreservedState::Cr0CacheControl,
        PreservedState::ApicBase,
    ] {
        assert!(s.preserved().contains(&kept), "{kept:?}");
    }
}

#[test]
fn sipi_start_applied_to_init_state_sdm_9_4_3() {
    let mut s = ArchResetState::after_init(DEFAULT_PROCESSOR_SIGNATURE);
    s.apply_start(&SipiAction::real_mode(0x9F));
    assert_eq!(s.cs.selector, 0x9F00);
    assert_eq!(s.cs.base, 0x9_F000);
    assert_eq!(s.cs.limit, 0xFFFF);
    assert_eq!(s.cs.access_rights, AR_CODE_RX_ACCESSED);
    assert_eq!(s.rip, 0);
}

// ---- property test (seeds 000, 002, 004) ----

#[derive(Clone, Copy, Debug)]
enum Op {
    LatchInit,
    LatchSipi(Vector),
    LatchInitSipi(Vector),
    Halt,
    Wake,
    ApResetHold,
    Accept { blocked: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::LatchInit),
        2 => any::<u8>().prop_map(Op::LatchSipi),
        1 => any::<u8>().prop_map(Op::LatchInitSipi),
        2 => Just(Op::Halt),
        2 => Just(Op::Wake),
        1 => Just(Op::ApResetHold),
        4 => any::<bool>().prop_map(|blocked| Op::Accept { blocked }),
    ]
}

/// Bookkeeping of the property test.
#[derive(Default)]
struct Tally {
    /// Times the latch went from "no INIT" to "INIT pending": INITs that must each be consumed.
    init_epochs: usize,
    resets: usize,
    starts: usize,
    /// A start happened since the last reset (a second one would be a double start).
    started_since_reset: bool,
}

fn run_ops(
    bsp: bool,
    protected: bool,
    ops: &[Op],
) -> Result<(MpStateMachine, Tally), TestCaseError> {
    let mut m = MpStateMachine::new(bsp);
    let mut standard = StandardSipi;
    let mut prot = ProtectedStateSipi::new();
    let mut t = Tally::default();
    for &op in ops.iter().chain([Op::Accept { blocked: false }].iter()) {
        let before = m.state();
        let init_before = m.pending_events().init;
        match op {
            Op::LatchInit | Op::LatchInitSipi(_) | Op::LatchSipi(_) => {
                let events = match op {
                    Op::LatchInit => INIT,
                    Op::LatchSipi(v) => sipi(v),
                    Op::LatchInitSipi(v) => ApicEvents {
                        init: true,
                        sipi: Some(v),
                        ..ApicEvents::default()
                    },
                    _ => unreachable!(),
                };
                m.latch(events);
                t.init_epochs += usize::from(events.init && !init_before);
                prop_assert_eq!(m.state(), before, "latching changes no state");
            }
            Op::Halt | Op::Wake | Op::ApResetHold => {
                match op {
                    Op::Halt => m.halt(),
                    Op::Wake => m.wake(),
                    _ => m.ap_reset_hold(),
                }
                // (a) HLT, wake or hold never consume or lose a latched INIT.
                prop_assert_eq!(m.pending_events().init, init_before);
                prop_assert!(MpState::transition_allowed(before, m.state(), bsp));
            }
            Op::Accept { blocked } => {
                let blocking = if blocked { SMM } else { InitBlocking::NONE };
                let booted_before = prot.has_booted();
                let plug: &mut dyn SipiDelivery = if protected { &mut prot } else { &mut standard };
                let out = m.accept_events(blocking, plug);
                // Every accept step consumes the SIPI latch.
                prop_assert_eq!(m.pending_events().sipi, None);
                if blocked {
                    prop_assert_eq!(out.reset, None);
                    prop_assert_eq!(out.start, None);
                    prop_assert_eq!(m.state(), before);
                    prop_assert_eq!(m.pending_events().init, init_before);
                    continue;
                }
                // (a) an unblocked step consumes a pending INIT, exactly once.
                prop_assert_eq!(out.reset.is_some(), init_before);
                prop_assert!(!m.pending_events().init);
                let mid = if let Some(ResetKind::Init { write_registers }) = out.reset {
                    t.resets += 1;
                    t.started_since_reset = false;
                    prop_assert_eq!(write_registers, !protected);
                    before.after_init(bsp)
                } else {
                    before
                };
                // (c) every step is a chain of table transitions.
                prop_assert!(MpState::transition_allowed(before, mid, bsp));
                prop_assert!(MpState::transition_allowed(mid, m.state(), bsp));
                if let Some(start) = out.start {
                    // (b) at most one start per INIT, and only from wait-for-SIPI.
                    prop_assert!(!t.started_since_reset, "second start without INIT");
                    prop_assert!(t.resets > 0);
                    prop_assert_eq!(mid, MpState::InitReceived);
                    prop_assert!(!bsp);
                    t.started_since_reset = true;
                    t.starts += 1;
                    if protected {
                        prop_assert_eq!(
                            start,
                            SipiAction::ResumeUntouched {
                                first_boot: !booted_before
                            }
                        );
                    } else {
                        let real_mode = matches!(start, SipiAction::StartRealMode { rip: 0, .. });
                        prop_assert!(real_mode, "standard start is real mode at RIP 0");
                    }
                } else {
                    prop_assert_eq!(m.state(), mid);
                }
            }
        }
        prop_assert!(bsp || m.state() != MpState::Runnable || t.starts > 0);
    }
    Ok((m, t))
}

proptest! {
    #[test]
    fn random_init_sipi_halt_sequences_keep_invariants(
        bsp in any::<bool>(),
        protected in any::<bool>(),
        ops in proptest::collection::vec(op(), 0..40),
    ) {
        let (m, t) = run_ops(bsp, protected, &ops)?;
        // (a) after the final unblocked step every INIT latched was consumed exactly once.
        prop_assert_eq!(t.resets, t.init_epochs);
        prop_assert!(!m.has_pending_init_or_sipi());
        // (b) never more starts than INITs; the BSP never starts from a SIPI.
        prop_assert!(t.starts <= t.resets);
        if bsp {
            prop_assert_eq!(t.starts, 0);
        }
    }

    #[test]
    fn set_from_user_never_panics(value in any::<u32>(), smm in any::<bool>(), bsp in any::<bool>()) {
        let mut m = MpStateMachine::new(bsp);
        let blocking = InitBlocking { smm, ..InitBlocking::NONE };
        if m.set_from_user(value, blocking).is_ok() {
            prop_assert_eq!(
                m.get_for_user(),
                if value == kvm_abi::SIPI_RECEIVED { kvm_abi::INIT_RECEIVED } else { value }
            );
        } else {
            prop_assert_eq!(m.state(), MpState::initial(bsp));
        }
    }
}
