//! Taking a snapshot of a running VM (the control API's `vm.snapshot`): pause every vCPU, have
//! each save its state on its own thread at a safe point, save the platform and the devices,
//! write the memory file and the state file. The VM stays paused afterwards, as Cloud
//! Hypervisor leaves it.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::format::{
    self, DeviceState, Header, SnapshotError, SnapshotState, TimeState, FORMAT_VERSION, MEMORY_FILE,
};
use crate::api::VmHandle;
use crate::vcpu::{VcpuSaved, VcpuState};

/// How long the vCPUs together may take to reach their safe point and save.
const VCPU_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an unanswered vCPU is kicked again (one settling an injection runs the guest
/// until its next exit).
const REKICK: Duration = Duration::from_millis(2);

/// How long the parts took.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotTimes {
    /// From the request to every vCPU paused with its state saved.
    pub pause_and_vcpus: Duration,
    /// The whole snapshot, files written.
    pub total: Duration,
}

/// Takes a snapshot of the VM behind `handle` into `dir` (created if missing), leaving the VM
/// paused. The VM must be running or paused, not stopped.
pub fn take(handle: &VmHandle, dir: &Path) -> Result<SnapshotTimes, SnapshotError> {
    let start = Instant::now();
    std::fs::create_dir_all(dir).map_err(SnapshotError::io(dir))?;
    let (state, pause_and_vcpus) = capture(handle)?;
    super::memory::write(&handle.snapshot.memory, &dir.join(MEMORY_FILE))?;
    format::write_state(dir, &state)?;
    Ok(SnapshotTimes {
        pause_and_vcpus,
        total: start.elapsed(),
    })
}

/// Pauses the VM behind `handle` (if it runs) and reads everything but its RAM: every vCPU at
/// its safe point, the platform, the devices, kvmclock. The VM stays paused; nothing of it runs
/// guest code after this returns until it is resumed, so its RAM is final (what live migration's
/// last round relies on). Returns the state and the time from the call to every vCPU saved.
pub fn capture(handle: &VmHandle) -> Result<(SnapshotState, Duration), SnapshotError> {
    let start = Instant::now();
    pause(handle)?;
    all_paused(handle)?;
    let saved = save_vcpus(handle)?;
    let pause_and_vcpus = start.elapsed();
    let source = &handle.snapshot;
    let platform = handle
        .chip
        .save_platform()
        .map_err(|e| SnapshotError::NotReady(format!("platform: {e}")))?;
    let devices: DeviceState = source.devices.save_state();
    let kvm_clock_ns = source.vm_fd.get_clock().map(|c| c.clock).unwrap_or(0);
    let (cpus, parts): (Vec<_>, Vec<_>) =
        saved.into_iter().map(|s| (s.cpu, s.fabric.model)).unzip();
    // The processor's part of the events travels with the CPU state.
    let memory_size = crate::memory::ram_size(&source.memory);
    let state = SnapshotState {
        header: Header {
            format_version: FORMAT_VERSION,
            irqvm_version: env!("CARGO_PKG_VERSION").into(),
            vcpus: cpus.len() as u32,
            memory_size,
            source_mode: format::mode_name(source.mode).into(),
        },
        time: TimeState {
            kvm_clock_ns,
            saved_at_unix_ns: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        },
        vcpus: cpus,
        chip: irqchip::snapshot::ChipSnapshot::new(parts, platform.devices),
        lowest_priority_turn: platform.lowest_priority_turn,
        devices,
        cpu_model: (*source.cpu_model).clone(),
    };
    Ok((state, pause_and_vcpus))
}

fn pause(handle: &VmHandle) -> Result<(), SnapshotError> {
    if handle.control.stop_requested() {
        return Err(SnapshotError::NotReady("the VM has stopped".into()));
    }
    if !handle.control.pause_requested() {
        crate::api::router::Control::pause(handle)
            .map_err(|e| SnapshotError::NotReady(e.to_string()))?;
    }
    Ok(())
}

/// Waits until every vCPU holds in its pause loop, kicking and waking the others. A pause
/// returns once no vCPU is in or around KVM_RUN, which counts a `user`-mode vCPU blocked in HLT as
/// held; but one that has just been woken is still "halted" while it prepares its next entry, and
/// would enter the guest once more. A vCPU that saved its state while another still ran guest
/// code could miss what that one sends it (an IPI, a device line it raises): so no vCPU saves
/// before all are paused, and none leaves its pause loop until the resume.
fn all_paused(handle: &VmHandle) -> Result<(), SnapshotError> {
    let deadline = Instant::now() + VCPU_TIMEOUT;
    loop {
        let mut waiting = false;
        for (index, vcpu) in handle.vcpus.iter().enumerate() {
            match vcpu.state() {
                VcpuState::Paused => {}
                VcpuState::Stopped => {
                    return Err(SnapshotError::NotReady(format!(
                        "vCPU {index} stopped during the snapshot"
                    )))
                }
                _ => {
                    waiting = true;
                    vcpu.kick.kick();
                    handle.chip.wake_vcpu(index);
                }
            }
        }
        if !waiting {
            return Ok(());
        }
        if handle.control.stop_requested() || !handle.control.pause_requested() {
            return Err(SnapshotError::NotReady(
                "the VM stopped or was resumed during the snapshot".into(),
            ));
        }
        if Instant::now() >= deadline {
            return Err(SnapshotError::NotReady(
                "a vCPU did not pause in time".into(),
            ));
        }
        std::thread::sleep(REKICK);
    }
}

/// Asks every vCPU for its state and waits, kicking (and waking, and nudging) the ones that
/// have not answered: a vCPU blocked in a `user`-mode HLT must come to its loop's top, one
/// settling an injection must leave the guest again.
fn save_vcpus(handle: &VmHandle) -> Result<Vec<VcpuSaved>, SnapshotError> {
    let requests: Vec<u64> = handle.vcpus.iter().map(|v| v.request_snapshot()).collect();
    let deadline = Instant::now() + VCPU_TIMEOUT;
    loop {
        let mut waiting = false;
        for (index, (vcpu, &n)) in handle.vcpus.iter().zip(&requests).enumerate() {
            if vcpu.snapshot_answered() >= n {
                continue;
            }
            if vcpu.state() == VcpuState::Stopped || handle.control.stop_requested() {
                return Err(SnapshotError::NotReady(format!(
                    "vCPU {index} stopped during the snapshot"
                )));
            }
            waiting = true;
            vcpu.kick.kick();
            handle.chip.wake_vcpu(index);
        }
        if !waiting {
            break;
        }
        handle.control.nudge_paused();
        if Instant::now() >= deadline {
            return Err(SnapshotError::NotReady(
                "a vCPU did not reach a safe point in time".into(),
            ));
        }
        std::thread::sleep(REKICK);
    }
    handle
        .vcpus
        .iter()
        .enumerate()
        .map(|(vcpu, v)| match v.take_snapshot() {
            Some(Ok(saved)) => Ok(*saved),
            Some(Err(what)) => Err(SnapshotError::Vcpu { vcpu, what }),
            None => Err(SnapshotError::Vcpu {
                vcpu,
                what: "no state saved".into(),
            }),
        })
        .collect()
}
