//! Everything of the interrupt architecture that belongs to one vCPU, put together: its local
//! APIC, its multiprocessor state, its posting inbox and its port on the APIC bus.
//!
//! A VMM creates one [`ApicSystem`] per VM, which hands out one [`VcpuInterrupts`] per vCPU to be
//! moved into that vCPU's thread. The thread then drives it around each guest entry:
//!
//! 1. [`VcpuInterrupts::begin_guest_entry`] publishes "in guest" and drains the inbox, in the
//!    order that makes a lost kick impossible (seed 001, see `posting`);
//! 2. [`VcpuInterrupts::accept_events`] consumes INIT/SIPI in the vCPU's own context (seed 000)
//!    and says what reset or start to apply;
//! 3. [`VcpuInterrupts::next_injection`] says what to inject (NMI, ExtINT, or an APIC vector) and
//!    the `take_*`/`acknowledge_*` methods consume it once the VMM is sure to inject it;
//! 4. guest accesses to the APIC (MMIO page, x2APIC MSRs, APIC base) go through the `*_read` /
//!    `*_write` methods here, which route IPIs on the bus, republish the topology and PPR, and
//!    return only what the VMM itself must act on (an EOI for the IOAPIC, a timer to re-arm);
//! 5. on HLT, [`VcpuInterrupts::halt`] and [`VcpuInterrupts::should_block`] decide whether the
//!    thread may sleep, and [`VcpuInterrupts::block`] sleeps without losing a wake-up.
//!
//! Other threads never touch a `VcpuInterrupts`: they post through the bus or an inbox.
//!
//! # Who takes the 8259's INTR
//!
//! Each vCPU publishes, in an atomic flag of the [`ApicSystem`], whether its local APIC would
//! take an interrupt from the 8259 PIC now ([`LocalApic::accepts_pic_interrupts`]: LINT0
//! unmasked in ExtINT mode, or the APIC globally disabled). The flag is republished after every
//! guest access to the APIC, every INIT and every restore. When the PIC's INTR output rises, the
//! chip wakes (or kicks) exactly the vCPUs whose flag is set ([`ApicSystem::wake_pic_acceptors`]).
//! No wake-up can be lost: the flag changes only on the vCPU's own thread while it runs guest
//! code, and a running vCPU reads INTR before every entry; a vCPU that blocks reads INTR in
//! [`VcpuInterrupts::should_block`] after its flag was published, and the wake-up post makes its
//! [`VcpuInterrupts::block`] return.
//!
//! # Snapshots
//!
//! [`VcpuInterrupts::save`] and [`VcpuInterrupts::restore`] run on the vCPU's own thread, with
//! the VM paused (no device or vCPU posting). See the `snapshot` module for the format.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::bus::ApicBus;
use crate::lapic::{LapicConfig, LapicEffect, LocalApic};
use crate::mpstate::{AcceptOutcome, InitBlocking, MpState, MpStateMachine, SipiDelivery};
use crate::posting::{Bell, Doorbell, Posted, VcpuInbox};
use crate::snapshot::{PendingEvents, SnapshotError, VcpuSnapshot};
use crate::topology::ApicIdLayout;
use crate::types::{
    ApicId, ClockConfig, EoiMessage, GuestFault, InterruptMessage, Nanos, Notify, TopologyEntry,
    VcpuIndex, Vector,
};

/// The most NMIs a vCPU keeps pending (KVM's `process_nmi`): one injected, one held behind it.
pub const MAX_PENDING_NMIS: u8 = crate::posting::MAX_POSTED_NMIS;

/// The bus every vCPU of a VM posts on.
pub type VmBus = ApicBus<VcpuInbox>;

/// Shape of a VM's APIC system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicSystemConfig {
    /// Number of vCPUs; vCPU 0 is the BSP, vCPU `i` gets the APIC ID [`Self::apic_ids`] gives
    /// it (`i` when packed).
    pub vcpus: usize,
    /// The clocks every local APIC timer counts.
    pub clock: ClockConfig,
    /// Offer x2APIC mode (the VMM must then also advertise `CPUID.1:ECX[21]`).
    pub x2apic: bool,
    /// Offer directed EOI (version register bit 24, SVR bit 12).
    pub directed_eoi: bool,
    /// Give every APIC the CMCI LVT ([`LapicConfig::cmci_supported`]; the VMM must then also
    /// advertise MCG_CAP.MCG_CMCI_P).
    pub cmci: bool,
    /// MAXPHYADDR as the VMM advertises it in CPUID 80000008H EAX\[7:0\]: IA32_APIC_BASE
    /// bits at and above it are reserved ([`LapicConfig::max_phys_addr`]).
    pub max_phys_addr: u8,
    /// The initial APIC ID of each vCPU (the VMM's CPUID topology must match it).
    pub apic_ids: ApicIdLayout,
    /// The VMM can put a vCPU in system-management mode. Then an SMI a local APIC accepts
    /// waits in [`VcpuInterrupts::smi_pending`] (and wakes a halted vCPU) until the VMM
    /// delivers it ([`VcpuInterrupts::take_smi`]). Without SMM no local APIC accepts an SMI,
    /// as KVM's refuses one where KVM cannot enter SMM (`kvm_inject_smi` failing in
    /// `__apic_accept_irq`): the bus posts an SMI message nowhere and counts no target
    /// ([`ApicBus::with_smm`], [`ApicBus::dropped_smis`]), and an SMI from the vCPU's own LVT
    /// (LINT0/LINT1 in delivery mode SMI) is dropped where the vCPU takes it
    /// ([`VcpuInterrupts::dropped_smis`]). Either way it wakes nothing and changes nothing. An
    /// SMI that stayed pending for a VMM that never delivers it would end every later HLT of
    /// that vCPU at once.
    pub smm: bool,
}

/// Why an [`ApicSystemConfig`] cannot be built as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApicSystemConfigError {
    /// The topology gives a vCPU an APIC ID wider than 32 bits.
    #[error("vCPU {index}'s APIC ID does not fit 32 bits in this topology")]
    ApicIdOverflow {
        /// The vCPU whose ID overflows.
        index: VcpuIndex,
    },
    /// An APIC ID of 255 or more without x2APIC, which alone can address it (SDM §11.12).
    #[error("APIC ID {0:#x} needs x2APIC mode (xAPIC IDs stop at 254), which is not offered")]
    NeedsX2apic(u32),
}

impl ApicSystemConfig {
    /// The configuration vCPU `index`'s local APIC gets in a system built from this (`None`
    /// past the last vCPU): what a VMM converting another implementation's APIC state (KVM's)
    /// into the model needs, without building the system.
    pub fn lapic(&self, index: VcpuIndex) -> Option<LapicConfig> {
        (index < self.vcpus).then(|| lapic_config(self, index))
    }

    /// Checks that every vCPU gets an APIC ID and, if any ID is past 254 (xAPIC's 8-bit IDs,
    /// 0xFF being the broadcast), that x2APIC is offered. [`ApicSystem::new`] expects a config
    /// that passes; otherwise a vCPU whose ID overflows gets ID 0xFFFF_FFFF, which nothing can
    /// address alone (it is the x2APIC broadcast).
    pub fn check(&self) -> Result<(), ApicSystemConfigError> {
        let Some(last) = self.vcpus.checked_sub(1) else {
            return Ok(());
        };
        let max = self
            .apic_ids
            .max_apic_id(self.vcpus)
            .ok_or(ApicSystemConfigError::ApicIdOverflow { index: last })?;
        if max.0 >= XAPIC_BROADCAST_ID && !self.x2apic {
            return Err(ApicSystemConfigError::NeedsX2apic(max.0));
        }
        Ok(())
    }
}

/// The xAPIC broadcast ID: the first ID xAPIC mode cannot give a single APIC.
const XAPIC_BROADCAST_ID: u32 = 0xFF;

/// One flag per vCPU: "my local APIC takes interrupts from the 8259 PIC now". Written by the
/// vCPU's thread, read by whoever raises the PIC's INTR (see the module documentation).
type PicAcceptors = Arc<[AtomicBool]>;

/// The VM-wide part: the bus and the inboxes, shared by every thread.
pub struct ApicSystem {
    config: ApicSystemConfig,
    bus: Arc<VmBus>,
    pic_acceptors: PicAcceptors,
}

impl ApicSystem {
    /// Builds the bus and one `VcpuInterrupts` per vCPU, vCPU 0 being the bootstrap processor
    /// with APIC ID 0 and vCPU n having the APIC ID `config.apic_ids` gives it (n when packed);
    /// see [`ApicSystemConfig::check`].
    pub fn new(config: ApicSystemConfig) -> (Self, Vec<VcpuInterrupts>) {
        Self::with_bells(config, |_| Box::new(Doorbell::new()))
    }

    /// [`Self::new`] with vCPU `i`'s inbox ringing and sleeping on `bell(i)` instead of a
    /// [`Doorbell`] of its own (e.g. [`crate::wake::SharedBell`]s, issue 14).
    pub fn with_bells(
        config: ApicSystemConfig,
        bell: impl FnMut(VcpuIndex) -> Box<dyn Bell>,
    ) -> (Self, Vec<VcpuInterrupts>) {
        let inboxes: Vec<Arc<VcpuInbox>> = (0..config.vcpus)
            .map(bell)
            .map(|bell| Arc::new(VcpuInbox::with_bell(bell)))
            .collect();
        let lapics: Vec<LocalApic> = (0..config.vcpus)
            .map(|index| LocalApic::new(lapic_config(&config, index)))
            .collect();
        let topology = lapics.iter().map(LocalApic::topology).collect();
        let bus = Arc::new(ApicBus::with_topology(inboxes.clone(), topology).with_smm(config.smm));
        let pic_acceptors: PicAcceptors = lapics
            .iter()
            .map(|lapic| AtomicBool::new(lapic.accepts_pic_interrupts()))
            .collect();
        let vcpus = lapics
            .into_iter()
            .zip(inboxes)
            .enumerate()
            .map(|(index, (lapic, inbox))| VcpuInterrupts {
                index,
                lapic,
                mp: MpStateMachine::new(index == 0),
                inbox,
                bus: bus.clone(),
                pic_acceptors: pic_acceptors.clone(),
                nmi_pending: 0,
                smm: config.smm,
                smi_pending: false,
                dropped_smis: 0,
                extint_pending: false,
                published_topology: TopologyEntry::default(),
            })
            .map(|mut cpu| {
                cpu.publish_all();
                cpu
            })
            .collect();
        let system = Self {
            config,
            bus,
            pic_acceptors,
        };
        (system, vcpus)
    }

    /// The configuration this system was built with.
    pub fn config(&self) -> ApicSystemConfig {
        self.config
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.config.vcpus
    }

    /// The static configuration of vCPU `index`'s local APIC (`None` past the last vCPU).
    pub fn lapic_config(&self, index: VcpuIndex) -> Option<LapicConfig> {
        (index < self.config.vcpus).then(|| lapic_config(&self.config, index))
    }

    /// Whether vCPU `index` last published that it takes interrupts from the 8259 PIC.
    pub fn accepts_pic_interrupts(&self, index: VcpuIndex) -> bool {
        self.pic_acceptors
            .get(index)
            .is_some_and(|flag| flag.load(Ordering::SeqCst))
    }

    /// The 8259's INTR output rose: posts a wake-up to every vCPU that would take it and
    /// reports the kicks/wakes the posts ask for. Returns how many vCPUs were told.
    pub fn wake_pic_acceptors(&self, notify: &mut dyn FnMut(VcpuIndex, Notify)) -> usize {
        let mut told = 0;
        for index in (0..self.bus.len()).filter(|&i| self.accepts_pic_interrupts(i)) {
            if let Some(inbox) = self.bus.sink(index) {
                told += 1;
                let how = inbox.post_wakeup();
                if how != Notify::None {
                    notify(index, how);
                }
            }
        }
        told
    }

    /// The bus, for devices (IOAPIC, MSIs) and other threads.
    pub fn bus(&self) -> &Arc<VmBus> {
        &self.bus
    }

    /// The inbox of a vCPU, for the VMM's kick/wake and timer paths.
    pub fn inbox(&self, index: VcpuIndex) -> Option<&Arc<VcpuInbox>> {
        self.bus.sink(index)
    }
}

fn lapic_config(config: &ApicSystemConfig, index: VcpuIndex) -> LapicConfig {
    LapicConfig {
        index,
        apic_id: config.apic_ids.apic_id(index).unwrap_or(ApicId(u32::MAX)),
        bsp: index == 0,
        clock: config.clock,
        x2apic_supported: config.x2apic,
        directed_eoi_supported: config.directed_eoi,
        cmci_supported: config.cmci,
        max_phys_addr: config.max_phys_addr,
    }
}

/// What the VMM must do after a guest access to the APIC, beyond completing the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicAccessResult {
    /// Nothing more.
    Done,
    /// A level-triggered vector was EOIed with broadcast: hand this to the IOAPIC(s).
    Eoi(EoiMessage),
    /// The APIC timer was (re)programmed: re-arm the VMM's timer at `next_timer_deadline`.
    TimerChanged,
}

/// What the vCPU should receive next, by priority: NMI before external interrupts
/// (SDM vol. 3 §7.7, "Priority Among Simultaneous Exceptions and Interrupts").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injection {
    /// A non-maskable interrupt (vector 2).
    Nmi,
    /// An interrupt whose vector comes from the 8259 PIC (an INTA cycle on the PIC).
    ExtInt,
    /// An interrupt from the local APIC's IRR.
    Vector(Vector),
}

/// One vCPU's interrupt state, owned by that vCPU's thread.
pub struct VcpuInterrupts {
    index: VcpuIndex,
    lapic: LocalApic,
    mp: MpStateMachine,
    inbox: Arc<VcpuInbox>,
    bus: Arc<VmBus>,
    /// NMIs taken from the inbox and not yet injected, at most two (see [`Self::process_nmi`]).
    nmi_pending: u8,
    /// SMIs are kept for the VMM to deliver ([`ApicSystemConfig::smm`]), else dropped.
    smm: bool,
    /// Latched SMI/ExtINT requests taken from the inbox, not yet injected.
    smi_pending: bool,
    /// SMIs taken from the inbox and dropped (no SMM).
    dropped_smis: u64,
    extint_pending: bool,
    published_topology: TopologyEntry,
    pic_acceptors: PicAcceptors,
}

impl VcpuInterrupts {
    /// Publishes everything other threads read about this vCPU (topology, PPR, PIC acceptance),
    /// unconditionally: at creation and after a restore.
    fn publish_all(&mut self) {
        self.published_topology = self.lapic.topology();
        self.bus
            .update_topology(self.index, self.published_topology);
        self.publish_priority();
        self.publish_pic_acceptance();
    }

    /// This vCPU's index on the bus.
    pub fn index(&self) -> VcpuIndex {
        self.index
    }

    /// The local APIC's registers (read-only; writes go through this type so effects are routed).
    pub fn lapic(&self) -> &LocalApic {
        &self.lapic
    }

    /// The MP state: runnable, halted, wait-for-SIPI, ...
    pub fn mp_state(&self) -> MpState {
        self.mp.state()
    }

    /// The inbox other threads post to; the VMM's kick path reads its mode.
    pub fn inbox(&self) -> &Arc<VcpuInbox> {
        &self.inbox
    }

    /// The APIC bus this vCPU sends its IPIs on.
    pub fn bus(&self) -> &Arc<VmBus> {
        &self.bus
    }

    // ---- guest entry and exit (seed 001) ----

    /// Right before entering the guest: publishes the highest in-service vector's class and
    /// "in guest", then drains what was posted. Anything posted after this drain kicks the
    /// vCPU, unless its vector cannot be delivered before an EOI, whose exit drains it
    /// (`posting`, issue 14). Every change of ISR happens on this thread outside the guest, so
    /// the class published here holds for the whole run, except for the rises published after
    /// the drain by [`Self::acknowledge_interrupt`] (a poster that misses them kicks in vain)
    /// and an INIT's reset by [`Self::accept_events`], after which the software-disabled APIC
    /// drops fixed vectors (SDM vol. 3 §11.4.7.2) until an SVR write, which exits.
    pub fn begin_guest_entry(&mut self) {
        let posted = self
            .inbox
            .begin_guest_entry_in_service(self.lapic.isr().highest());
        self.absorb(posted);
    }

    /// Right after the guest exits.
    pub fn end_guest_entry(&mut self) {
        self.inbox.end_guest_entry();
    }

    /// Takes what was posted, outside guest mode (after a wake-up, before deciding to block).
    pub fn drain(&mut self) {
        let posted = self.inbox.drain();
        self.absorb(posted);
    }

    fn absorb(&mut self, posted: Posted) {
        if posted.is_empty() {
            return;
        }
        self.lapic.accept_posted(&posted.pir, &posted.level);
        self.mp.latch(posted.events);
        self.nmi_pending = (self.nmi_pending + posted.nmis).min(MAX_PENDING_NMIS);
        if posted.events.smi && !self.smm {
            self.dropped_smis += 1;
        }
        self.smi_pending |= posted.events.smi && self.smm;
        self.extint_pending |= posted.events.extint;
        self.publish_priority();
    }

    // ---- INIT / SIPI (seeds 000, 002, 004) ----

    /// Consumes latched INIT/SIPI in this vCPU's own context. On INIT the local APIC is reset
    /// here; the caller applies `outcome.reset` to the registers and `outcome.start` (SIPI).
    /// Whether INIT restarts the vCPU or parks it in wait-for-SIPI follows its IA32_APIC_BASE.BSP
    /// flag now, as KVM's `kvm_vcpu_is_bsp` does ([`MpStateMachine::accept_events_with_bsp_flag`]).
    pub fn accept_events(
        &mut self,
        blocking: InitBlocking,
        sipi: &mut dyn SipiDelivery,
    ) -> AcceptOutcome {
        let bsp_flag = self.lapic.bsp_flag();
        let outcome = self
            .mp
            .accept_events_with_bsp_flag(blocking, bsp_flag, sipi);
        if outcome.reset.is_some() {
            // INIT clears pending NMI/SMI/ExtINT requests along with the processor state.
            self.lapic.init_reset();
            self.nmi_pending = 0;
            self.smi_pending = false;
            self.extint_pending = false;
            self.publish_topology();
            self.publish_priority();
            self.publish_pic_acceptance();
        }
        outcome
    }

    /// True when INIT or SIPI wait to be consumed by [`Self::accept_events`].
    pub fn needs_accept(&self, blocking: InitBlocking) -> bool {
        self.mp.needs_accept(blocking)
    }

    // ---- injection ----

    /// What to inject next, if anything, given whether the 8259's INTR output is high. Only a
    /// running vCPU takes interrupts; an SMI is reported by [`Self::smi_pending`].
    pub fn next_injection(&self, pic_intr: bool) -> Option<Injection> {
        if !self.mp.state().runs_guest() {
            return None;
        }
        if self.nmi_pending > 0 {
            return Some(Injection::Nmi);
        }
        self.next_maskable_injection(pic_intr)
    }

    /// What to inject next while NMIs are blocked (an NMI handler runs until its IRET): the
    /// ExtINT or APIC vector [`Self::next_injection`] would give with no NMI pending. NMI
    /// blocking holds back NMIs only; a maskable interrupt is taken as soon as IF allows it
    /// (SDM vol. 3 §6.7.1, §6.8.1), and KVM injects one while its NMI waits for the NMI window.
    pub fn next_maskable_injection(&self, pic_intr: bool) -> Option<Injection> {
        if !self.mp.state().runs_guest() {
            return None;
        }
        if self.extint_pending || (pic_intr && self.lapic.accepts_pic_interrupts()) {
            return Some(Injection::ExtInt);
        }
        self.lapic.pending_interrupt().map(Injection::Vector)
    }

    /// How many NMIs may stay pending, as KVM's `process_nmi` decides it: while no NMI is in
    /// service, two (one to inject now, one held until the first one's IRET); while one is in
    /// service (`blocked`: NMIs blocked until the next IRET, or an NMI injection still in flight),
    /// one, held until that IRET. Pending NMIs beyond the limit coalesce, here and now. Call it
    /// with the CPU's NMI blocking state before injecting; returns the NMIs left pending.
    ///
    /// Hardware keeps one NMI latched behind one in service (SDM vol. 3 §6.7.1); KVM allows a
    /// second one while none is in service because it cannot react to NMIs as fast as hardware
    /// (two that arrive together would otherwise become one).
    pub fn process_nmi(&mut self, blocked: bool) -> u8 {
        let limit = if blocked { 1 } else { MAX_PENDING_NMIS };
        self.nmi_pending = self.nmi_pending.min(limit);
        self.nmi_pending
    }

    /// One NMI is being injected: consume it. False if none was pending.
    pub fn take_nmi(&mut self) -> bool {
        let pending = self.nmi_pending > 0;
        self.nmi_pending = self.nmi_pending.saturating_sub(1);
        pending
    }

    /// How many NMIs wait to be injected (0, 1 or 2).
    pub fn pending_nmis(&self) -> u8 {
        self.nmi_pending
    }

    /// The ExtINT is being injected (the VMM acknowledges the PIC): consume the request.
    pub fn take_extint(&mut self) {
        self.extint_pending = false;
    }

    /// True while an NMI waits to be injected (it wakes a vCPU halted with IF=0).
    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending > 0
    }

    /// True while an SMI waits to be delivered.
    pub fn smi_pending(&self) -> bool {
        self.smi_pending
    }

    /// The SMI is being delivered: consume it.
    pub fn take_smi(&mut self) -> bool {
        std::mem::take(&mut self.smi_pending)
    }

    /// How many SMIs from this vCPU's own LVT it dropped for want of SMM
    /// ([`ApicSystemConfig::smm`]; the bus refuses the others, [`ApicBus::dropped_smis`]).
    pub fn dropped_smis(&self) -> u64 {
        self.dropped_smis
    }

    /// The vector is being injected: the INTA cycle moves it from IRR to ISR.
    pub fn acknowledge_interrupt(&mut self) -> Option<Vector> {
        let vector = self.lapic.acknowledge_interrupt();
        self.publish_priority();
        vector
    }

    // ---- paravirtual EOI ----

    /// Arms a paravirtual EOI for the run about to begin (KVM's PV EOI, Linux
    /// Documentation/virt/kvm/x86/msr.rst, MSR_KVM_PV_EOI_EN): returns the vector the guest may
    /// then retire by clearing the flag in its memory instead of writing the EOI register, after
    /// publishing the in-service class the run may fall to
    /// ([`VcpuInbox::publish_eoi_without_exit`]). The VMM sets the guest's flag only for `Some`,
    /// and at the run's exit calls [`Self::paravirtual_eoi`] if the guest cleared it. `None`: no
    /// candidate ([`LocalApic::paravirtual_eoi_candidate`]) or something was posted since the
    /// entry's drain. Call it last before KVM_RUN, after the injection.
    pub fn arm_paravirtual_eoi(&mut self) -> Option<Vector> {
        let vector = self.lapic.paravirtual_eoi_candidate()?;
        let mut rest = self.lapic.isr();
        rest.remove(vector);
        self.inbox
            .publish_eoi_without_exit(rest.highest())
            .then_some(vector)
    }

    /// The guest cleared the flag of a paravirtual EOI armed by [`Self::arm_paravirtual_eoi`]:
    /// the EOI its skipped register write would have made, with its effects.
    pub fn paravirtual_eoi(&mut self) -> ApicAccessResult {
        let effect = self.lapic.paravirtual_eoi();
        self.after_write(effect, &mut |_, _| {})
    }

    // ---- halting ----

    /// The guest executed HLT.
    pub fn halt(&mut self) {
        self.mp.halt();
    }

    /// The hypervisor still holds an NMI for this vCPU that it has not delivered (one the VMM
    /// handed it, which it delivers at a later entry): a halt ends as it ends for an NMI pending
    /// here (SDM vol. 3 §6.7: an NMI takes the processor out of the HLT state). Halted becomes
    /// Runnable; every other state stays (an NMI does not start a CPU waiting for a SIPI).
    pub fn wake_for_held_nmi(&mut self) {
        self.mp.wake();
    }

    /// The guest parked itself with an AP Reset Hold request (protected-state guests).
    pub fn ap_reset_hold(&mut self) {
        self.mp.ap_reset_hold();
    }

    /// True when the vCPU has nothing to do: not runnable and nothing that would wake it. A
    /// halted vCPU with a deliverable interrupt or NMI is made runnable here.
    pub fn should_block(&mut self, blocking: InitBlocking, pic_intr: bool) -> bool {
        if self.mp.needs_accept(blocking) {
            return false;
        }
        if self.mp.state() == MpState::Halted && self.halt_wake_pending(pic_intr) {
            self.mp.wake();
        }
        !self.mp.state().runs_guest()
    }

    fn halt_wake_pending(&self, pic_intr: bool) -> bool {
        self.nmi_pending > 0
            || self.smi_pending
            || self.extint_pending
            || (pic_intr && self.lapic.accepts_pic_interrupts())
            || self.lapic.pending_interrupt().is_some()
    }

    /// Sleeps until something is posted to this vCPU, unless something already was. Returns
    /// after any post (or a spurious ring); the caller drains and re-evaluates. An AP in
    /// wait-for-SIPI sleeps through an INIT alone and takes it with the SIPI that follows
    /// (`posting`, issue 13): an INIT would leave it where it is.
    pub fn block(&mut self) {
        self.block_until(None);
    }

    /// [`Self::block`], waking at `until` too, posted or not: the host instant of this vCPU's
    /// own next timer deadline, which its VMM fires itself rather than posting it.
    pub fn block_until(&mut self, until: Option<std::time::Instant>) {
        let blocked = if self.init_leaves_blocked() {
            self.inbox.try_block_awaiting_sipi()
        } else {
            self.inbox.try_block()
        };
        if blocked {
            self.inbox.block_until_rung_or(until);
        }
        self.drain();
    }

    /// True for an AP that has not run since power-up or since its last INIT (wait-for-SIPI):
    /// its registers and local APIC are in their INIT state, which only INIT and SIPI leave
    /// (nothing else is accepted: the APIC is software-disabled, SDM vol. 3 §11.4.7.2), so an
    /// INIT taken now would change nothing and it would sleep again. Not for the BSP, which an
    /// INIT restarts (seed 000), nor for an AP Reset Hold, whose INIT resets a used APIC.
    fn init_leaves_blocked(&self) -> bool {
        !self.mp.is_bsp()
            && matches!(
                self.mp.state(),
                MpState::Uninitialized | MpState::InitReceived
            )
    }

    // ---- guest accesses ----

    /// A read of the xAPIC MMIO page at `offset` from its base.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now: Nanos) {
        self.lapic.mmio_read(offset, data, now);
    }

    /// A write to the xAPIC MMIO page. `notify` receives the kicks/wakes the IPI requires.
    pub fn mmio_write(
        &mut self,
        offset: u64,
        data: &[u8],
        now: Nanos,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> ApicAccessResult {
        let effect = self.lapic.mmio_write(offset, data, now);
        self.after_write(effect, notify)
    }

    /// RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register.
    pub fn msr_read(&mut self, msr: u32, now: Nanos) -> Result<u64, GuestFault> {
        self.lapic.msr_read(msr, now)
    }

    /// WRMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register.
    pub fn msr_write(
        &mut self,
        msr: u32,
        value: u64,
        now: Nanos,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> Result<ApicAccessResult, GuestFault> {
        let effect = self.lapic.msr_write(msr, value, now)?;
        Ok(self.after_write(effect, notify))
    }

    /// The guest (or, with `host_initiated`, the VMM restoring state) writes IA32_APIC_BASE.
    pub fn set_apic_base(&mut self, value: u64, host_initiated: bool) -> Result<(), GuestFault> {
        let effect = self.lapic.set_apic_base(value, host_initiated)?;
        self.after_write(effect, &mut |_, _| {});
        Ok(())
    }

    /// CR8 as the guest left it (kvm_run.cr8 on exit): `TPR[7:4]` (SDM vol. 3 §11.8.6).
    pub fn sync_cr8(&mut self, cr8: u64) {
        if cr8 != self.lapic.cr8() {
            self.lapic.set_cr8(cr8);
            self.publish_priority();
        }
    }

    /// Runs the APIC timer up to `now`; an expiry sets its vector in IRR.
    pub fn poll_timer(&mut self, now: Nanos) {
        self.lapic.poll_timer(now);
    }

    /// When the VMM must next call [`Self::poll_timer`].
    pub fn next_timer_deadline(&self) -> Option<Nanos> {
        self.lapic.next_timer_deadline()
    }

    fn after_write(
        &mut self,
        effect: LapicEffect,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> ApicAccessResult {
        let result = match effect {
            LapicEffect::None => ApicAccessResult::Done,
            LapicEffect::SendIpi(message) => {
                self.send(&message, notify);
                ApicAccessResult::Done
            }
            LapicEffect::Eoi(eoi) => ApicAccessResult::Eoi(eoi),
            // A mode change also stops or resumes the timer (it does not fire while the APIC
            // is globally disabled), so the VMM re-reads the timer deadline too.
            LapicEffect::TopologyChanged => {
                self.publish_topology();
                ApicAccessResult::TimerChanged
            }
            LapicEffect::TimerChanged => ApicAccessResult::TimerChanged,
        };
        // SVR writes change what the bus may deliver (software enable) without being a
        // topology change of the APIC's addressing; TPR writes, EOIs and self-IPIs change the
        // priority lowest-priority arbitration sees. Both republish only on a real change.
        self.publish_topology();
        self.publish_priority();
        self.publish_pic_acceptance();
        result
    }

    /// Puts an IPI on the bus. A message to this very vCPU lands in its own inbox and is taken
    /// at the next drain, like any other.
    fn send(&mut self, message: &InterruptMessage, notify: &mut dyn FnMut(VcpuIndex, Notify)) {
        let own = self.index;
        self.bus.deliver(message, &mut |target, how| {
            if target != own {
                notify(target, how);
            }
        });
        // A self-IPI must be visible before the next entry without a kick.
        self.drain();
    }

    fn publish_topology(&mut self) {
        let topology = self.lapic.topology();
        if topology != self.published_topology {
            self.published_topology = topology;
            self.bus.update_topology(self.index, topology);
        }
    }

    /// PPR for lowest-priority arbitration, and the in-service class for the posters' kick
    /// decision (a rise must be published after an acknowledge; a fall is published again by
    /// [`Self::begin_guest_entry`] before its drain, where it matters).
    fn publish_priority(&self) {
        self.inbox.publish_ppr(self.lapic.ppr());
        self.inbox.publish_in_service(self.lapic.isr().highest());
    }

    /// SeqCst: pairs with the load in [`ApicSystem::wake_pic_acceptors`] (module documentation).
    fn publish_pic_acceptance(&self) {
        if let Some(flag) = self.pic_acceptors.get(self.index) {
            flag.store(self.lapic.accepts_pic_interrupts(), Ordering::SeqCst);
        }
    }

    // ---- snapshots ----

    /// The guest TSC at `now` as this vCPU's APIC timer sees it (after a restore, the VMM sets
    /// the vCPU's real TSC to this value).
    pub fn guest_tsc(&self, now: Nanos) -> u64 {
        self.lapic.timer().guest_tsc(now)
    }

    /// Saves this vCPU's interrupt state at `now`, on its own thread, with the VM paused.
    ///
    /// The inbox is drained into the state first (vectors into IRR/TMR, INIT/SIPI into the MP
    /// latch, NMI/SMI/ExtINT into the pending flags), exactly as the next drain would have done,
    /// so a posted interrupt is in the snapshot once and nowhere else. The local APIC is stored
    /// on the snapshot's own timeline, where the save instant is time 0: its timer holds the
    /// time left, not absolute times (see `snapshot`).
    pub fn save(&mut self, now: Nanos) -> VcpuSnapshot {
        self.drain();
        let mut lapic = self.lapic.clone();
        lapic.rebase_timeline(now, 0);
        VcpuSnapshot {
            index: self.index,
            lapic,
            mp: self.mp.clone(),
            pending: PendingEvents {
                nmi: self.nmi_pending > 0,
                nmi_held: self.nmi_pending > 1,
                smi: self.smi_pending,
                extint: self.extint_pending,
            },
        }
    }

    /// Checks that `snapshot` can be restored into this vCPU (see [`VcpuSnapshot::check`]).
    pub fn check_snapshot(&self, snapshot: &VcpuSnapshot) -> Result<(), SnapshotError> {
        snapshot.check(self.index, self.lapic.config())
    }

    /// Replaces this vCPU's interrupt state by `snapshot`, at `now`, on its own thread, with
    /// the VM paused. Anything posted to the inbox before the restore is discarded (it belongs
    /// to the state being replaced). The timer continues with the time it had left, the guest
    /// TSC continues from its saved value, and the topology, PPR and PIC acceptance are
    /// republished. A snapshot that fails [`Self::check_snapshot`] changes nothing.
    pub fn restore(&mut self, snapshot: &VcpuSnapshot, now: Nanos) -> Result<(), SnapshotError> {
        self.check_snapshot(snapshot)?;
        let _discarded = self.inbox.drain();
        let mut lapic = snapshot.lapic.clone();
        lapic.rebase_timeline(0, now);
        self.lapic = lapic;
        self.mp = snapshot.mp.clone();
        self.nmi_pending = u8::from(snapshot.pending.nmi) + u8::from(snapshot.pending.nmi_held);
        // A pending SMI from a VMM with SMM cannot be delivered without it.
        self.smi_pending = snapshot.pending.smi && self.smm;
        self.extint_pending = snapshot.pending.extint;
        self.publish_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! NMI queueing as KVM's `process_nmi` does it, through the real bus and inboxes (no
    //! threads but the AP of the INIT/SIPI test; the clock is a constant, nothing here depends
    //! on time).
    use super::*;
    use crate::mpstate::StandardSipi;
    use crate::types::{ApicEvents, InterruptSink, TriggerMode};

    const NOW: Nanos = 0;
    /// xAPIC ICR low for an NMI (delivery mode 100b), physical destination.
    const ICR_NMI: u32 = 0x400;
    const SVR_ENABLED: u32 = 0x1FF;

    fn system(vcpus: usize) -> (ApicSystem, Vec<VcpuInterrupts>) {
        system_with_smm(vcpus, false)
    }

    fn system_with_smm(vcpus: usize, smm: bool) -> (ApicSystem, Vec<VcpuInterrupts>) {
        ApicSystem::new(ApicSystemConfig {
            vcpus,
            clock: ClockConfig::default(),
            x2apic: true,
            directed_eoi: true,
            cmci: false,
            max_phys_addr: 39,
            apic_ids: Default::default(),
            smm,
        })
    }

    fn post_smi(cpu: &mut VcpuInterrupts) {
        let _ = cpu.inbox().post_events(ApicEvents {
            smi: true,
            ..Default::default()
        });
    }

    /// One vCPU, halted, that then took an SMI from its inbox.
    fn halted_with_an_smi(smm: bool) -> (ApicSystem, Vec<VcpuInterrupts>) {
        let (system, mut cpus) = system_with_smm(1, smm);
        cpus[0].halt();
        post_smi(&mut cpus[0]);
        cpus[0].drain();
        (system, cpus)
    }

    fn write(cpu: &mut VcpuInterrupts, offset: u64, value: u32) {
        cpu.mmio_write(offset, &value.to_le_bytes(), NOW, &mut |_, _| {});
    }

    /// vCPU `from` sends an NMI IPI to APIC ID `to` through its ICR.
    fn send_nmi(cpu: &mut VcpuInterrupts, to: u32) {
        write(cpu, 0xF0, SVR_ENABLED);
        write(cpu, 0x310, to << 24);
        write(cpu, 0x300, ICR_NMI);
    }

    fn post_nmi(cpu: &VcpuInterrupts) {
        let _ = cpu.inbox().post_events(ApicEvents {
            nmi: true,
            ..Default::default()
        });
    }

    /// Injects NMIs the way a VMM does after `process_nmi(blocked)`; returns how many.
    fn inject_nmis(cpu: &mut VcpuInterrupts, blocked: bool) -> u8 {
        cpu.process_nmi(blocked);
        let mut n = 0;
        while cpu.next_injection(false) == Some(Injection::Nmi) {
            assert!(cpu.take_nmi());
            n += 1;
        }
        n
    }

    /// A paravirtual EOI: armed for the vector just injected, it publishes the class the run may
    /// fall to (a lower vector posted then kicks); the guest's flag-clearing EOI retires it.
    /// Not armed when something was posted since the entry's drain.
    #[test]
    fn paravirtual_eoi_arms_publishes_the_fall_and_retires_the_vector() {
        let (_system, mut cpus) = system(1);
        let cpu = &mut cpus[0];
        write(cpu, 0xF0, SVR_ENABLED);
        let _ = cpu.inbox().post_vector(0x50, TriggerMode::Edge);
        cpu.begin_guest_entry();
        assert_eq!(cpu.acknowledge_interrupt(), Some(0x50));
        assert_eq!(cpu.inbox().published_in_service_class(), 5);
        assert_eq!(cpu.arm_paravirtual_eoi(), Some(0x50));
        assert_eq!(cpu.inbox().published_in_service_class(), 0);
        assert_eq!(
            cpu.inbox().post_vector(0x40, TriggerMode::Edge),
            Notify::Kick,
            "0x40 is deliverable once the guest clears its flag"
        );
        assert_eq!(cpu.paravirtual_eoi(), ApicAccessResult::Done);
        assert!(cpu.lapic().isr().is_empty());
        cpu.end_guest_entry();

        cpu.begin_guest_entry();
        assert_eq!(cpu.acknowledge_interrupt(), Some(0x40));
        let _ = cpu.inbox().post_vector(0x30, TriggerMode::Edge);
        assert_eq!(
            cpu.arm_paravirtual_eoi(),
            None,
            "0x30 was posted after the drain and may have skipped its kick"
        );
    }

    /// Two CPUs send vCPU 0 an NMI at the same moment (both before vCPU 0 drains), while no
    /// NMI is in service: both are taken, one injected and one held (KVM `process_nmi`).
    #[test]
    fn two_simultaneous_nmis_with_none_in_service_are_both_kept() {
        let (_system, mut cpus) = system(3);
        let (first, rest) = cpus.split_at_mut(1);
        send_nmi(&mut rest[0], 0);
        send_nmi(&mut rest[1], 0);
        let bsp = &mut first[0];
        bsp.begin_guest_entry();
        assert_eq!(bsp.pending_nmis(), 2);
        assert_eq!(inject_nmis(bsp, false), 2);
        assert!(!bsp.nmi_pending());
    }

    /// While one NMI is in service (blocked until IRET), one more is held; the rest coalesce.
    #[test]
    fn nmis_while_one_is_in_service_hold_one() {
        let (_system, mut cpus) = system(1);
        let cpu = &mut cpus[0];
        for _ in 0..3 {
            post_nmi(cpu);
        }
        cpu.drain();
        assert_eq!(inject_nmis(cpu, true), 1, "blocked: one held");
        post_nmi(cpu);
        cpu.drain();
        post_nmi(cpu);
        cpu.drain();
        assert_eq!(
            inject_nmis(cpu, true),
            1,
            "one more held, the other coalesced"
        );
        assert_eq!(inject_nmis(cpu, true), 0);
    }

    /// More than two NMIs with none in service: two are kept, the rest coalesce; a held NMI
    /// counts against the limit once an NMI is in service.
    #[test]
    fn more_than_two_nmis_coalesce_to_the_limit() {
        let (_system, mut cpus) = system(1);
        let cpu = &mut cpus[0];
        for _ in 0..5 {
            post_nmi(cpu);
            cpu.drain();
        }
        assert_eq!(cpu.pending_nmis(), 2);
        assert_eq!(cpu.process_nmi(false), 2);
        // One injected; the second is now held behind an NMI in service.
        assert!(cpu.take_nmi());
        post_nmi(cpu);
        cpu.drain();
        assert_eq!(cpu.process_nmi(true), 1);
        assert!(cpu.take_nmi());
        assert!(!cpu.take_nmi());
    }

    /// INIT discards pending NMIs; a halted vCPU (even with none in service) wakes for one.
    #[test]
    fn init_discards_pending_nmis_and_an_nmi_wakes_a_halted_vcpu() {
        let (_system, mut cpus) = system(1);
        let cpu = &mut cpus[0];
        post_nmi(cpu);
        post_nmi(cpu);
        cpu.drain();
        let _ = cpu.inbox().post_events(ApicEvents {
            init: true,
            ..Default::default()
        });
        cpu.drain();
        let _ = cpu.accept_events(InitBlocking::NONE, &mut StandardSipi);
        assert_eq!(cpu.pending_nmis(), 0);
        cpu.halt();
        assert!(cpu.should_block(InitBlocking::NONE, false));
        post_nmi(cpu);
        cpu.drain();
        assert!(!cpu.should_block(InitBlocking::NONE, false));
        assert_eq!(cpu.next_injection(false), Some(Injection::Nmi));
    }

    /// An NMI pending while NMIs are blocked does not hold back a vector: the vector is what
    /// goes in beside it, and the NMI stays pending for the NMI window.
    #[test]
    fn a_vector_is_injected_beside_an_nmi_waiting_for_its_window() {
        let (_system, mut cpus) = system(1);
        let cpu = &mut cpus[0];
        write(cpu, 0xF0, SVR_ENABLED);
        // Fixed, vector 45H, destination shorthand self (SDM §11.6.1).
        write(cpu, 0x300, 0x4_0045);
        post_nmi(cpu);
        cpu.drain();
        assert_eq!(cpu.next_injection(false), Some(Injection::Nmi));
        assert_eq!(
            cpu.next_maskable_injection(false),
            Some(Injection::Vector(0x45))
        );
        assert_eq!(cpu.acknowledge_interrupt(), Some(0x45));
        assert_eq!(cpu.next_injection(false), Some(Injection::Nmi));
        assert_eq!(cpu.next_maskable_injection(false), None);
        cpu.halt();
        assert_eq!(cpu.next_maskable_injection(false), None);
    }

    /// An NMI the hypervisor holds ends a halt as one pending here does, with nothing for the
    /// model to inject; a CPU waiting for its SIPI stays where it is.
    #[test]
    fn an_nmi_held_by_the_hypervisor_ends_a_halt_only() {
        let (_system, mut cpus) = system(2);
        let (bsp, ap) = cpus.split_at_mut(1);
        let (bsp, ap) = (&mut bsp[0], &mut ap[0]);
        bsp.halt();
        assert!(bsp.should_block(InitBlocking::NONE, false));
        bsp.wake_for_held_nmi();
        assert_eq!(bsp.mp_state(), MpState::Runnable);
        assert!(!bsp.should_block(InitBlocking::NONE, false));
        assert_eq!(bsp.next_injection(false), None);
        // An AP waits for its SIPI from the start.
        assert_eq!(ap.mp_state(), MpState::Uninitialized);
        ap.wake_for_held_nmi();
        assert_eq!(ap.mp_state(), MpState::Uninitialized);
        assert!(ap.should_block(InitBlocking::NONE, false));
    }

    /// Without SMM an SMI is dropped where the vCPU takes it: a vCPU halted before it stays
    /// halted, nothing waits to be injected, and the drop is counted. The halt ends for an NMI
    /// as before.
    #[test]
    fn without_smm_an_smi_is_dropped_and_wakes_nothing() {
        let (_system, mut cpus) = halted_with_an_smi(false);
        let cpu = &mut cpus[0];
        assert!(!cpu.smi_pending());
        assert_eq!(cpu.dropped_smis(), 1);
        assert!(cpu.should_block(InitBlocking::NONE, false));
        assert_eq!(cpu.mp_state(), MpState::Halted);
        post_nmi(cpu);
        cpu.drain();
        assert!(!cpu.should_block(InitBlocking::NONE, false));
    }

    /// With SMM the SMI waits for the VMM, wakes a halted vCPU, and is taken once.
    #[test]
    fn with_smm_an_smi_wakes_a_halted_vcpu_and_is_taken_once() {
        let (_system, mut cpus) = halted_with_an_smi(true);
        let cpu = &mut cpus[0];
        assert!(cpu.smi_pending());
        assert!(!cpu.should_block(InitBlocking::NONE, false));
        assert!(cpu.take_smi());
        assert!(!cpu.take_smi());
        assert_eq!(cpu.dropped_smis(), 0);
    }

    /// A snapshot's pending SMI is restored only into a vCPU that can deliver it.
    #[test]
    fn a_pending_smi_is_restored_only_with_smm() {
        let (_system, mut cpus) = system_with_smm(1, true);
        post_smi(&mut cpus[0]);
        let saved = cpus[0].save(NOW);
        assert!(saved.pending.smi);
        let (_a, mut with) = system_with_smm(1, true);
        with[0].restore(&saved, NOW).unwrap();
        assert!(with[0].smi_pending());
        let (_b, mut without) = system_with_smm(1, false);
        without[0].restore(&saved, NOW).unwrap();
        assert!(!without[0].smi_pending());
    }

    /// A snapshot keeps both pending NMIs, and an old snapshot without `nmi_held` reads as one.
    #[test]
    fn snapshot_keeps_a_held_nmi() {
        let (_system, mut cpus) = system(1);
        let cpu = &mut cpus[0];
        post_nmi(cpu);
        post_nmi(cpu);
        let saved = cpu.save(NOW);
        assert!(saved.pending.nmi && saved.pending.nmi_held);
        let (_other, mut fresh) = system(1);
        fresh[0].restore(&saved, NOW).unwrap();
        assert_eq!(fresh[0].pending_nmis(), 2);
        let json = r#"{"nmi":true,"smi":false,"extint":false}"#;
        let old: PendingEvents = serde_json::from_str(json).unwrap();
        assert!(old.nmi && !old.nmi_held);
    }

    /// Issue 13: an INIT alone does not wake an AP asleep in wait-for-SIPI (here: never
    /// started); the SIPI does, and the AP takes both in its own context, INIT exactly once and
    /// first, and starts at the SIPI's vector (seed 000). The AP sleeps on a thread of its own.
    #[test]
    fn an_ap_awaiting_sipi_sleeps_through_the_init_and_starts_on_the_sipi() {
        let (system, mut cpus) = system(2);
        let mut ap = cpus.pop().expect("two vCPUs");
        let inbox = Arc::clone(ap.inbox());
        let thread = std::thread::spawn(move || {
            let (mut inits, mut start) = (0, None);
            while ap.mp_state() != MpState::Runnable {
                ap.block();
                let outcome = ap.accept_events(InitBlocking::NONE, &mut StandardSipi);
                inits += usize::from(outcome.reset.is_some());
                start = start.or(outcome.start);
            }
            (inits, start)
        });
        while inbox.mode() != crate::posting::VcpuMode::AwaitingSipi {
            std::thread::yield_now();
        }
        let bsp = &mut cpus[0];
        write(bsp, 0xF0, SVR_ENABLED);
        write(bsp, 0x310, 1 << 24);
        let mut wakes = Vec::new();
        let send = |bsp: &mut VcpuInterrupts, icr: u32, wakes: &mut Vec<VcpuIndex>| {
            bsp.mmio_write(0x300, &icr.to_le_bytes(), NOW, &mut |t, how| {
                if how == Notify::Wake {
                    wakes.push(t);
                }
            });
        };
        send(bsp, 0x4500, &mut wakes);
        assert!(wakes.is_empty(), "the INIT woke the AP");
        send(bsp, 0x4610, &mut wakes);
        for &target in &wakes {
            system.inbox(target).expect("AP inbox").ring_doorbell();
        }
        let (inits, start) = thread.join().expect("AP thread");
        assert_eq!(inits, 1);
        assert_eq!(
            start,
            Some(crate::mpstate::SipiAction::StartRealMode {
                cs_selector: 0x1000,
                cs_base: 0x10000,
                rip: 0,
            })
        );
    }

    /// INIT follows the vCPU's IA32_APIC_BASE.BSP flag as the guest left it: vCPU 0 with the
    /// flag cleared waits for a SIPI (as in KVM, measured by the guest `init_again`), and its
    /// LAPIC keeps the cleared flag across the INIT.
    #[test]
    fn init_parks_vcpu0_in_wait_for_sipi_once_its_bsp_flag_is_cleared() {
        let (_system, mut cpus) = system(2);
        let (bsp, ap) = cpus.split_at_mut(1);
        let (bsp, ap) = (&mut bsp[0], &mut ap[0]);
        let base = bsp.lapic().apic_base();
        assert!(bsp.lapic().bsp_flag());
        let cleared = base & !crate::lapic::regs::APIC_BASE_BSP;
        bsp.set_apic_base(cleared, false)
            .expect("the BSP flag is writable");
        write(ap, 0xF0, SVR_ENABLED);
        ap.mmio_write(0x300, &0x4500u32.to_le_bytes(), NOW, &mut |_, _| {});
        bsp.begin_guest_entry();
        let outcome = bsp.accept_events(InitBlocking::NONE, &mut StandardSipi);
        assert!(outcome.reset.is_some(), "the INIT was taken");
        assert_eq!(bsp.mp_state(), MpState::InitReceived);
        assert_eq!(bsp.lapic().apic_base(), cleared);
        assert!(!bsp.lapic().bsp_flag());
    }

    /// The APIC system hands its MAXPHYADDR to every local APIC.
    #[test]
    fn max_phys_addr_reaches_every_lapic() {
        let (system, cpus) = system(2);
        for cpu in &cpus {
            assert_eq!(cpu.lapic().config().max_phys_addr, 39);
        }
        assert_eq!(system.lapic_config(1).map(|c| c.max_phys_addr), Some(39));
        let mut cpus = cpus;
        let base = cpus[1].lapic().apic_base();
        assert!(cpus[1].set_apic_base(base | (1 << 39), false).is_err());
        assert_eq!(cpus[1].lapic().apic_base(), base);
    }
}
