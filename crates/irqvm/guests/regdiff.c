/* regdiff: a seeded random program over the interrupt controllers whose transcript must be the same in
 * every irqchip mode: `kernel` mode (KVM's LAPIC, IOAPIC and PIC) is the reference, `split` compares irqvm's
 * IOAPIC and PIC against it, `user` all three. `irqvm diff-guest` and tests/regdiff.rs run it in each mode and
 * compare the transcripts line by line.
 *
 * On one vCPU, CPU 0 runs every operation. On two or more, CPU 0 and CPU 1 take turns (a third of the
 * operations run on CPU 1, marked `cpu1`; CPUs 2 and up park with interrupts off): CPU 1 waits in a loop with
 * interrupts off until CPU 0 hands it an operation or asks for its state, so both CPUs act in one order in
 * every mode. IPIs then pass between the CPUs (fixed, NMI, level-triggered, to physical and logical
 * destinations chosen to reach CPU 0, CPU 1, both or neither), IOAPIC entries name either CPU, and each line
 * carries CPU 1's state hash after CPU 0's (`s=CPU0/CPU1`; in `dump=1` lines CPU 1's keys start with `1.`).
 *
 * Command line: `seed=S` (default 1), `ops=N` (default 200, the guest suites' run; `irqvm diff-guest` asks
 * for 800), `dump=1` (each line lists every value read instead of their hash: run it with the seed and mode
 * that differ to see which register it is).
 *
 * Each operation prints one line: its number, what it did, what the access returned (a read's value, a
 * fault as fa00000e), and a hash of the state after it: every LAPIC register readable in the APIC's current
 * mode (the xAPIC page or the x2APIC MSRs, each read's fault included), IA32_APIC_BASE, CR8, whether the TSC
 * deadline is armed, every IOAPIC register, both ELCRs, and the NMIs taken so far.
 *
 * What keeps the transcript independent of timing, so that a difference is a difference in behaviour:
 *  - Interrupts are never taken (IF stays clear): vectors collect in IRR, with TMR, and IOAPIC entries keep
 *    remote IRR until they are switched to edge. (KVM's LAPIC on this host drops a vector from ISR when it
 *    delivers it, docs/kvm-facts.md, so ISR and PPR after a delivery cannot be compared.) NMIs are taken;
 *    KVM takes them at its next exit, which the operation's closing exits provide.
 *  - Every operation ends with a port exit and an IA32_APIC_BASE read (an exit KVM handles itself in
 *    `kernel` mode), so work KVM does at its next entry (the split-mode EOI exit of a level vector, a TSC
 *    deadline that had passed when written) is done before the state is read.
 *  - The APIC timer never fires by itself: initial counts are 0 or at least 2^31 with a divider of 64 or
 *    128 (over two minutes at KVM's 1 GHz APIC bus); a TSC deadline is 0, 1 (already passed: fires at the
 *    write, into IRR) or 2^42 cycles ahead. The current count is read as zero or not.
 *  - Nothing reaches a CPU that would restart it: INIT goes only to "all excluding self" on one vCPU and
 *    is only the level de-assert (which no APIC acts on) on two (from the ICR; in an LVT or an IOAPIC entry
 *    it becomes fixed); a SIPI is sent only on two vCPUs, where no CPU waits for one (only a CPU in the
 *    wait-for-SIPI state acts on a SIPI; a running one ignores it, as KVM's `kvm_apic_accept_events` does).
 *  - Vectors are 32-255.
 *  - Lines are driven through pc-testdev: ISA IRQs 1 and 3-15 (to the 8259s and IOAPIC pins 1, 3-15; not
 *    IRQ 0, which goes to pin 2, nor the cascade IRQ 2) and pins 16-23 (the IOAPIC only), each only to the
 *    other level (a pulse only from low). The 8259s' requests are read through OCW3 and polls, never
 *    acknowledged by the CPU (IF stays clear).
 *  - The xAPIC page is never moved.
 * What differs between the modes by design (docs/irqchip-modes.md) is left out of the state or never written:
 *  - the LAPIC version's bit 24 (directed EOI: KVM offers it only with the IOAPIC outside KVM), so SVR bit 12
 *    is never set; the IOAPIC version's low byte (KVM's in-kernel IOAPIC is 11H, irqvm's 20H), and so the
 *    EOI register, which only the 20H part has (KVM ignores writes to it): never written;
 *  - APR (`[kvm-apr-zero]`), ESR bits 5-7 (`[kvm-no-esr-illegal-reg]`, `[kvm-no-esr-illegal-vector]`: no
 *    vector below 16 is sent, no xAPIC offset without a register or with a stale read is touched), LVT bits
 *    12 and 14 (`[kvm-lvt-status-writable]`), xAPIC LDR bits 23:0 (KVM keeps the x2APIC LDR there across
 *    x2APIC -> disabled -> xAPIC);
 *  - x2APIC writes with reserved bits in TPR, SVR, an LVT or TDCR, or a non-zero EOI (`[kvm-x2apic-lax-rsvd]`);
 *  - the ICR's destination (xAPIC ICR2, x2APIC ICR bits 63:32) from a mode change of IA32_APIC_BASE until
 *    the guest writes it again (`[kvm-icr-halves]`: KVM keeps the xAPIC ICR2 and the x2APIC destination
 *    apart, the model has one destination for both): an xAPIC ICR write then writes ICR2 first;
 *  - LVT timer mode 11b (reserved; `[kvm-timer-11b]`: KVM's TMICT write in that mode stops the timer and
 *    TMCCT goes on reading the previous count, the model counts as in one-shot mode): written as periodic;
 *  - a TSC deadline already passed when written while the timer cannot interrupt (LVT masked or APIC
 *    software-disabled; `[kvm-timer-masked-pending]`: KVM keeps the expiry pending, the deadline reading
 *    armed; the model, as SDM vol. 3 §11.5.1 says of a masked LVT,
 *    fires into the mask and the interrupt is lost): such a write is 2^42 cycles ahead instead;
 *  - a CR8 write of the class TPR already holds while TPR's bits 3:0 are not zero, or may not be (the APIC
 *    disabled: TPR cannot be read) (`[user-cr8-same-class]`:
 *    MOV to CR8 clears them, SDM vol. 3 §11.8.6.1, but KVM reports CR8 to a userspace LAPIC only as a
 *    value at its exits, so `user` mode cannot see a write that does not change it);
 *  - an IOAPIC entry's bits 55:49 (the extended destination ID of KVM_FEATURE_MSI_EXT_DEST_ID, which
 *    `user` and `split` mode offer and read; KVM's in-kernel IOAPIC reads only bits 63:56): written 0;
 *  - an IOAPIC entry's destination FFH (`[kvm-ioapic-remote-irr-nobody]`: KVM delivers a broadcast
 *    outside its APIC map and sets remote IRR for a level message that found no enabled APIC there, e.g.
 *    with the APIC globally disabled, so the pin waits for an EOI that cannot come; the model sets it only
 *    when an APIC accepted the message, 82093AA §3.2.4): written FEH; for the same reason no level-triggered
 *    entry with a logical destination that matches no enabled APIC is unmasked or has its line changed (KVM
 *    takes its slow path whenever its APIC map is off, e.g. for an LDR with several bits or APICs in different
 *    DFR models, and counts "no APIC matched" as delivered): such a write goes physical, the line is kept;
 *  - lowest-priority delivery (`[kvm-vector-hashing]`: sent as fixed), IOAPIC delivery modes 011b, 110b and
 *    ExtINT (sent as fixed), IOAPIC polarity (KVM ignores INTPOL; irqvm models the wire, PCI pins 16-23
 *    idle high, and a write that flips INTPOL is an edge): entries are programmed as the pins are wired,
 *    from the start and in every write, ISA active high, PCI active low;
 *  - with two CPUs, while one APIC is in xAPIC and the other in x2APIC mode (both enabled; a configuration
 *    the SDM does not provide for): no logical destination (IPIs go physical; an IOAPIC entry's low word is
 *    written physical, a logical entry's high word is not written and its line is kept) and no physical
 *    broadcast ID from either mode (`[kvm-mixed-apic-modes]`: KVM resolves such messages through its APIC
 *    map, built for one mode, so an xAPIC APIC is reached through x2APIC cluster arithmetic and an xAPIC
 *    sender's FFH is no broadcast; irqvm has each APIC match the message by its own mode);
 *  - a logical NMI (from the ICR or an IOAPIC entry) that names a software-disabled APIC
 *    (`[kvm-logical-map-sw-disabled]`: KVM's APIC map takes its logical model from the software-enabled
 *    APICs only and leaves software-disabled ones out of its xAPIC tables, so it drops such an NMI in xAPIC
 *    mode while the map is on, and in any mode while no software-enabled APIC has an LDR; irqvm delivers
 *    it, as SDM vol. 3 §11.4.7.2 says a software-disabled APIC takes NMIs): sent as fixed, which such an
 *    APIC drops;
 *  - a DFR model other than flat (1111b) or cluster (0000b) (`[kvm-dfr-reserved-model]`: KVM's APIC map
 *    reads any other model as cluster and its slow path as matching nothing): the model written is 1111b or
 *    0000b.
 */
#include "guest.h"

#define XAPIC 0xFEE00000ul
#define IOAPIC 0xFEC00000ul
#define GP_CAUGHT (13 + 1)
#define IOAPIC_PINS 24

static u64 seed = 1, ops = 200, dump;
/* CPU 1 takes part (the VM has two vCPUs or more; any others are parked with interrupts off). */
static bool two_cpus;

/* ---- deterministic random numbers (splitmix64 seeding, xorshift64*) ---------------------------------------- */
static u64 rng_state;
static u64 rnd(void)
{
	u64 x = rng_state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state = x;
	return x * 0x2545F4914F6CDD1Dul;
}
static u32 below(u32 n) { return (u32)(rnd() % n); }
static bool chance(u32 one_in) { return below(one_in) == 0; }
/* A 32-bit value with the shapes registers care about: small, all ones, one bit, or anything. */
static u32 any32(void)
{
	switch (below(6)) {
	case 0: return below(256);
	case 1: return 0xFFFFFFFFu;
	case 2: return 1u << below(32);
	case 3: return (u32)rnd() & 0x000FFFFF;
	default: return (u32)rnd();
	}
}

/* ---- NMIs taken (interrupts never are: IF stays clear) ---------------------------------------------------- */
static volatile u32 nmi_count[2];
static void on_nmi(struct irq_frame *f, u32 cpu)
{
	if (cpu < 2)
		nmi_count[cpu]++;
}

/* ---- the state read after every operation --------------------------------------------------------------- */
/* Per CPU: whether the ICR's destination has been written since the last mode change (see the header). */
static bool icr_written[2];
#define icr_destination_written icr_written[this_cpu()]
/* Per CPU: IA32_APIC_BASE as last read (after every operation, by the CPU itself). */
static volatile u64 apic_base_of[2];
/* Both APICs enabled, one in xAPIC and one in x2APIC mode (see the header: no logical destination then). */
static bool modes_mixed(void)
{
	u64 a = apic_base_of[0], b = apic_base_of[1];
	return (a & b & APIC_BASE_EN) && ((a ^ b) & APIC_BASE_EXTD);
}
/* Per CPU: LDR, DFR and SVR as last read (by note_lapic, with IA32_APIC_BASE; kept while the APIC is
 * disabled, when no destination matches it anyway). */
static volatile u32 ldr_of[2], dfr_of[2], svr_of[2];
/* Whether CPU c's APIC is enabled and matches the logical destination `dest` (8 bits) in its own mode
 * (SDM vol. 3 §11.6.2.2, §11.12.10.2; with one vCPU CPU 1 is never enabled). */
static bool logical_match(u32 c, u32 dest)
{
	u64 base = apic_base_of[c];
	u32 ldr = ldr_of[c], id = ldr >> 24;
	if (!(base & APIC_BASE_EN))
		return false;
	if (base & APIC_BASE_EXTD)
		return (ldr >> 16) == (dest >> 16) && (ldr & dest & 0xFFFF);
	if (dfr_of[c] >> 28 == 0xF)
		return (id & dest) != 0;
	return (id >> 4) == (dest >> 4) && (id & dest & 0xF);
}
static bool logical_reaches_an_apic(u32 dest) { return logical_match(0, dest) || logical_match(1, dest); }
/* Whether a logical destination names a software-disabled APIC (see the header). */
static bool logical_reaches_sw_disabled(u32 dest)
{
	for (u32 c = 0; c < 2; c++)
		if (!(svr_of[c] & 0x100) && logical_match(c, dest))
			return true;
	return false;
}
/* An ICR low word as the modes share it: a logical NMI that would reach a software-disabled APIC is sent as
 * fixed (see the header). */
static u32 shared_nmi(u32 lo, u32 dest)
{
	bool logical_nmi = ((lo >> 8) & 7) == 4 && (lo & APIC_DEST_LOGICAL) && !(lo & 0xC0000);
	return logical_nmi && logical_reaches_sw_disabled(dest) ? lo & ~0x700u : lo;
}
/* Whether an unmasked IOAPIC entry (low and high word) could send what the modes treat differently by
 * design (see the header): a logical destination while the APIC modes are mixed, a level-triggered
 * logical destination no APIC matches, or a logical NMI to a software-disabled APIC. */
static bool entry_differs_by_design(u32 lo, u32 hi)
{
	if (!(lo & APIC_DEST_LOGICAL) || (lo & IOAPIC_MASKED))
		return false;
	return modes_mixed() || ((lo & IOAPIC_LEVEL) && !logical_reaches_an_apic(hi >> 24)) ||
	       (((lo >> 8) & 7) == 4 && logical_reaches_sw_disabled(hi >> 24));
}
static u32 state_hash;
static void note(u32 key, u64 value)
{
	if (dump)
		printf(this_cpu() ? " 1.%x=%lx" : " %x=%lx", key, value);
	state_hash = (state_hash ^ key) * 16777619u;
	state_hash = (state_hash ^ (u32)value) * 16777619u;
	state_hash = (state_hash ^ (u32)(value >> 32)) * 16777619u;
}
static u64 read_cr8(void)
{
	u64 v;
	__asm__ volatile("mov %%cr8, %0" : "=r"(v));
	return v;
}
static void write_cr8(u64 v) { __asm__ volatile("mov %0, %%cr8" : : "r"(v) : "memory"); }
static u32 xapic_read(u32 off) { return *(volatile u32 *)(XAPIC + off); }
static void xapic_write(u32 off, u32 v) { *(volatile u32 *)(XAPIC + off) = v; }
static u32 ioregsel_read(void) { return *(volatile u32 *)IOAPIC; }
static void ioregsel_write(u32 v) { *(volatile u32 *)IOAPIC = v; }
static u32 iowin_read(void) { return *(volatile u32 *)(IOAPIC + 0x10); }
static void iowin_write(u32 v) { *(volatile u32 *)(IOAPIC + 0x10) = v; }
static void settle(void)
{
	inb(0x80);
	rdmsr(APIC_BASE_MSR);
}

/* The registers of SDM vol. 3 table 11-1 the state includes (TMCCT only as zero or not). */
static const u16 lapic_regs[] = { 0x20, 0x30, 0x80, 0x90, 0xA0, 0xD0, 0xE0, 0xF0, 0x100, 0x110, 0x120, 0x130,
	0x140, 0x150, 0x160, 0x170, 0x180, 0x190, 0x1A0, 0x1B0, 0x1C0, 0x1D0, 0x1E0, 0x1F0, 0x200, 0x210, 0x220,
	0x230, 0x240, 0x250, 0x260, 0x270, 0x280, 0x300, 0x310, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x380,
	0x390, 0x3E0 };
#define N_LAPIC_REGS (sizeof(lapic_regs) / sizeof(lapic_regs[0]))

/* A LAPIC register's value as the modes share it (see the header); faults pass unchanged. */
static u64 shared_value(u32 off, u64 v, bool x2)
{
	if (v == (0xFA000000ul | GP_CAUGHT))
		return v;
	switch (off) {
	case APIC_TMCCT: return v != 0;
	case APIC_VERSION: return v & ~(1ul << 24);
	case APIC_APR: return 0;
	case APIC_ESR: return v & ~0xE0ul;
	case APIC_LDR: return x2 ? v : v & 0xFF000000ul;
	case APIC_LVT_TIMER: case APIC_LVT_THERMAL: case APIC_LVT_PERF: case APIC_LVT_LINT0:
	case APIC_LVT_LINT1: case APIC_LVT_ERROR: return v & ~0x5000ul;
	default: return v;
	}
}
/* Keeps the registers a destination is matched with (ldr_of, dfr_of, svr_of). */
static void keep_destination_registers(u32 off, u64 v)
{
	u32 cpu = this_cpu();
	if (off == APIC_LDR)
		ldr_of[cpu] = (u32)v;
	else if (off == APIC_DFR)
		dfr_of[cpu] = (u32)v;
	else if (off == APIC_SVR)
		svr_of[cpu] = (u32)v;
}
static void note_lapic(u64 base)
{
	bool x2 = (base & APIC_BASE_EXTD) != 0;
	if (!(base & APIC_BASE_EN))
		return;
	for (u32 i = 0; i < N_LAPIC_REGS; i++) {
		u32 off = lapic_regs[i];
		u64 v;
		if (x2) {
			u32 fault = rdmsr_catch(0x800 + off / 16, &v);
			if (fault)
				v = 0xFA000000ul | fault;
		} else {
			v = xapic_read(off);
		}
		keep_destination_registers(off, v);
		if (off == APIC_APR || (off == APIC_ICR2 && !icr_destination_written))
			continue;
		if (off == APIC_ICR && x2 && !icr_destination_written)
			v = (u32)v;
		note(off, shared_value(off, v, x2));
	}
}
static void note_ioapic(void)
{
	u32 sel = ioregsel_read();
	note(0x1000, sel);
	for (u32 reg = 0; reg < 0x10 + 2 * IOAPIC_PINS; reg++) {
		if (reg >= 3 && reg < 0x10)
			continue;
		ioregsel_write(reg);
		u32 v = iowin_read();
		note(0x1100 + reg, reg == 1 ? v & ~0xFFu : v);
	}
	ioregsel_write(sel);
}
/* Whether the timer can interrupt now: the APIC enabled (IA32_APIC_BASE.EN, SVR bit 8) and its LVT unmasked. */
static bool timer_unmasked(u64 base)
{
	if (!(base & APIC_BASE_EN))
		return false;
	bool x2 = base & APIC_BASE_EXTD;
	u64 svr = x2 ? rdmsr(0x80F) : xapic_read(APIC_SVR);
	u64 lvt = x2 ? rdmsr(0x832) : xapic_read(APIC_LVT_TIMER);
	return (svr >> 8) & 1 && !(lvt & APIC_LVT_MASKED);
}
/* What this CPU reads of its own: its APIC, CR8, TSC deadline and NMIs. */
static void note_cpu(void)
{
	u64 base = rdmsr(APIC_BASE_MSR), deadline = 0;
	u32 cpu = this_cpu();
	apic_base_of[cpu] = base;
	note(0x1B, base);
	note(0xC8, read_cr8());
	u32 fault = rdmsr_catch(MSR_TSC_DEADLINE, &deadline);
	note(0x6E0, fault ? 0xFA000000ul | fault : deadline != 0);
	note_lapic(base);
	note(0x2000, nmi_count[cpu]);
}
/* CPU 0's state hash: its own registers and the shared ones (IOAPIC, ELCRs). */
static u64 note_cpu0(void)
{
	settle();
	state_hash = 2166136261u;
	note_cpu();
	note_ioapic();
	note(0x4D0, inb(0x4D0));
	note(0x4D1, inb(0x4D1));
	return state_hash;
}
/* CPU 1's state hash: its own registers (dump=1 names them 1.key). */
static u64 note_cpu1(void)
{
	settle();
	state_hash = 2166136261u;
	note_cpu();
	return state_hash;
}

/* ---- values within what the modes share (see the header) --------------------------------------------------- */
static u32 delivery_mode(u32 lo) { return (lo >> 8) & 7; }
static u32 as_fixed(u32 lo) { return lo & ~0x700u; }
static u32 vector_at_least_32(u32 v) { return (v & 0xFF) < 32 ? v | 0x20 : v; }
/* An ICR low word: lowest priority sent as fixed; on one vCPU SIPI as fixed and INIT only to "all excluding
 * self" (shorthand 11b); on two a SIPI (both CPUs run, so it is ignored) and only the INIT level de-assert. */
static u32 shared_icr(u32 lo)
{
	u32 mode = delivery_mode(lo);
	lo = vector_at_least_32(lo);
	if (two_cpus && modes_mixed())
		lo &= ~(u32)APIC_DEST_LOGICAL;
	if (mode == 1 || (mode == 6 && !two_cpus))
		return as_fixed(lo);
	if (mode == 5 && two_cpus) /* only the level de-assert, which nobody acts on (see the header) */
		return (lo & 0xC000) == 0x8000 ? lo : as_fixed(lo);
	if (mode == 5)
		return lo | APIC_SH_OTHERS;
	return lo;
}
/* An ICR destination (x2APIC: 32 bits; xAPIC: ICR2, the ID in bits 31:24) as the modes share it: not the
 * broadcast ID while the modes are mixed (see the header). */
static u32 unmixed(bool x2, u32 dest)
{
	bool broadcast = x2 ? dest == 0xFFFFFFFFu : dest >> 24 == 0xFF;
	return two_cpus && modes_mixed() && broadcast ? dest ^ (x2 ? 1u : 1u << 24) : dest;
}
/* With two CPUs, a destination that reaches CPU 0, CPU 1, both or neither in some addressing mode: physical
 * IDs 0-3, the broadcast ID, xAPIC flat bits or clusters 0-15 (members in bits 3:0), x2APIC clusters 0 and 1,
 * or anything. */
static u32 destination(bool x2)
{
	switch (below(6)) {
	case 0: return below(4);
	case 1: return x2 ? 0xFFFFFFFFu : 0xFF;
	case 2: return x2 ? below(2) << 16 | below(16) : below(16);
	case 3: return x2 ? (u32)rnd() : below(256);
	default: return x2 ? below(4) : below(16) << 4 | below(16);
	}
}
/* An LVT: INIT and SIPI become fixed. */
static u32 shared_lvt(u32 lo)
{
	u32 mode = delivery_mode(lo);
	lo = vector_at_least_32(lo);
	return mode == 5 || mode == 6 ? as_fixed(lo) : lo;
}
/* An IOAPIC redirection entry's low word: fixed, NMI or SMI only (lowest priority, 011b, INIT, 110b and
 * ExtINT become fixed); ISA pins 0-15 active high, PCI pins 16-23 active low, as their wires are. */
static u32 shared_redirection(u32 pin, u32 lo)
{
	u32 mode = delivery_mode(lo);
	lo = vector_at_least_32(lo) & ~(u32)IOAPIC_ACTIVE_LOW;
	if (pin >= 16)
		lo |= IOAPIC_ACTIVE_LOW;
	return mode == 0 || mode == 2 || mode == 4 ? lo : as_fixed(lo);
}
static u32 timer_count(void)
{
	switch (below(3)) {
	case 0: return 0;
	case 1: return 0xFFFFFFFFu;
	default: return 0x80000000u | (u32)rnd();
	}
}
/* Divide by 64 (1001b) or 128 (1010b), the other bits random. */
static u32 timer_divide(void) { return ((u32)rnd() & ~0xBu) | (chance(2) ? 0x9 : 0xA); }
/* The bits an x2APIC WRMSR may set in each LVT without #GP in the model (SDM vol. 3 §11.5.1, figure 11-8;
 * delivery status and remote IRR left out, see the header). */
static u32 x2apic_lvt_bits(u32 off)
{
	switch (off) {
	case APIC_LVT_TIMER: return 0x700FF;
	case APIC_LVT_LINT0: case APIC_LVT_LINT1: return 0x1A7FF;
	case APIC_LVT_ERROR: return 0x100FF;
	default: return 0x107FF;
	}
}

/* A value for APIC register `off`. */
static u32 lapic_value(u32 off, bool x2)
{
	u32 v = any32();
	switch (off) {
	case APIC_ICR: return shared_icr(v);
	case APIC_ICR2: return two_cpus && chance(2) ? destination(false) << 24 | (v & 0xFFFFFF) : v;
	case APIC_DFR: return v & 0x10000000u ? v | 0xF0000000u : v & 0x0FFFFFFFu; /* flat or cluster */
	case APIC_LVT_TIMER:
		if ((v & 0x60000) == 0x60000)
			v &= ~0x40000u; /* mode 11b (reserved) becomes periodic, see the header */
		return shared_lvt(x2 ? v & x2apic_lvt_bits(off) : v);
	case APIC_LVT_THERMAL: case APIC_LVT_PERF: case APIC_LVT_LINT0:
	case APIC_LVT_LINT1: case APIC_LVT_ERROR: case 0x2F0:
		return shared_lvt(x2 ? v & x2apic_lvt_bits(off) : v);
	case APIC_TMICT: return timer_count();
	case APIC_TDCR: return x2 ? timer_divide() & 0xB : timer_divide();
	case APIC_SELF_IPI: return vector_at_least_32(v);
	case APIC_TPR: return x2 || chance(2) ? below(256) : v;
	case APIC_EOI: return x2 ? 0 : v;
	case APIC_SVR: return v & (x2 ? 0x3FF : ~(u32)APIC_SVR_SUPPRESS_EOI_BROADCAST);
	default: return v;
	}
}
/* A register to write: mostly the writable ones; in x2APIC mode also any MSR of the range (#GP both ways). */
static u32 lapic_offset(bool x2)
{
	static const u16 writable[] = { 0x20, 0x80, 0xB0, 0xB0, 0xD0, 0xE0, 0xF0, 0x280, 0x300, 0x300, 0x300,
		0x310, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x380, 0x3E0 };
	if (chance(5))
		return x2 ? below(0x100) * 0x10 : lapic_regs[below(N_LAPIC_REGS)];
	if (x2 && chance(8))
		return APIC_SELF_IPI;
	return writable[below(sizeof(writable) / sizeof(writable[0]))];
}

/* ---- the operations ------------------------------------------------------------------------------------- */
static char what[96];

/* Sends `lo` to `dest` (as unmixed() has it) through the ICR, xAPIC ICR2 first; names the access in `what`
 * and returns an x2APIC #GP as the operation's result. */
static u64 write_icr(bool x2, u32 dest, u32 lo)
{
	if (x2) {
		u64 v = (u64)dest << 32 | lo;
		sfmt(what, sizeof(what), "wrmsr 830 %lx", v);
		if (wrmsr_catch(0x830, v))
			return 0xFA000000ul | GP_CAUGHT;
	} else {
		sfmt(what, sizeof(what), "mmio 310 <- %x, 300 <- %x", dest, lo);
		xapic_write(APIC_ICR2, dest);
		xapic_write(APIC_ICR, lo);
	}
	icr_destination_written = true;
	return 0;
}
static u64 op_lapic_write(u64 base)
{
	bool x2 = (base & APIC_BASE_EXTD) != 0;
	u32 off = lapic_offset(x2), v = lapic_value(off, x2);
	if (x2 && off == APIC_ICR) {
		u32 dest = two_cpus ? unmixed(true, destination(true))
				    : chance(2) ? 0 : chance(2) ? 0xFFFFFFFFu : (u32)rnd();
		return write_icr(true, dest, shared_nmi(v, dest));
	}
	if (x2) {
		u64 v64 = chance(16) ? (u64)(u32)rnd() << 32 | v : v;
		sfmt(what, sizeof(what), "wrmsr %x %lx", 0x800 + off / 16, v64);
		return wrmsr_catch(0x800 + off / 16, v64) ? 0xFA000000ul | GP_CAUGHT : 0;
	}
	if (off == APIC_ICR) {
		u32 icr2 = icr_destination_written ? xapic_read(APIC_ICR2)
						   : two_cpus ? destination(false) << 24 : (u32)rnd();
		u32 dest = unmixed(false, icr2);
		v = shared_nmi(v, dest >> 24);
		if (!icr_destination_written || dest != icr2)
			return write_icr(false, dest, v);
		sfmt(what, sizeof(what), "mmio 300 <- %x", v);
		xapic_write(APIC_ICR, v);
		return 0;
	}
	icr_destination_written |= off == APIC_ICR2;
	sfmt(what, sizeof(what), "mmio %x <- %x", off, v);
	xapic_write(off, v);
	return 0;
}
static u64 op_lapic_read(u64 base)
{
	if (base & APIC_BASE_EXTD) {
		u32 msr = 0x800 + below(0x100);
		u64 v;
		sfmt(what, sizeof(what), "rdmsr %x", msr);
		if (rdmsr_catch(msr, &v))
			v = 0xFA000000ul | GP_CAUGHT;
		else if (msr == 0x830 && !icr_destination_written)
			v = (u32)v;
		return shared_value((msr - 0x800) * 16, v, true);
	}
	u32 off = lapic_regs[below(N_LAPIC_REGS)];
	sfmt(what, sizeof(what), "mmio %x", off);
	if (off == APIC_ICR2 && !icr_destination_written)
		return 0;
	return shared_value(off, xapic_read(off), false);
}
static u32 max_phys_addr; /* CPUID 80000008H EAX[7:0] */
static u64 op_apic_base(u64 base)
{
	static const u64 shapes[] = { APIC_BASE_EN, APIC_BASE_EN | APIC_BASE_EXTD, 0, APIC_BASE_EXTD };
	u64 v = 0xFEE00000ul | shapes[below(4)] | (base & APIC_BASE_BSP);
	if (chance(4))
		v ^= APIC_BASE_BSP;
	if (chance(8)) /* a reserved bit: 7:0, 9, or at or above MAXPHYADDR (never an address bit) */
		v |= 1ul << (chance(2) ? (chance(9) ? 9 : below(8)) : max_phys_addr + below(64 - max_phys_addr));
	sfmt(what, sizeof(what), "wrmsr 1b %lx", v);
	if (wrmsr_catch(APIC_BASE_MSR, v))
		return 0xFA000000ul | GP_CAUGHT;
	if ((v ^ base) & (APIC_BASE_EN | APIC_BASE_EXTD))
		icr_destination_written = false;
	return 0;
}
static u64 op_tsc_deadline(u64 base)
{
	u64 v = chance(3) ? 0 : chance(2) ? 1 : rdtsc() + (1ul << 42);
	if (v == 1 && !timer_unmasked(base))
		v = rdtsc() + (1ul << 42);
	sfmt(what, sizeof(what), "wrmsr 6e0 %s", v == 0 ? "0" : v == 1 ? "past" : "future");
	return wrmsr_catch(MSR_TSC_DEADLINE, v) ? 0xFA000000ul | GP_CAUGHT : 0;
}
static u64 op_cr8(u64 base)
{
	/* See the header: no CR8 write of the class TPR holds while TPR bits 3:0 may be set (always
	 * so while the APIC is disabled: TPR cannot be read then). */
	u64 v = below(16);
	bool low_bits = true;
	if (base & APIC_BASE_EN)
		low_bits = (base & APIC_BASE_EXTD ? rdmsr(0x808) : xapic_read(APIC_TPR)) & 0xF;
	if (v == read_cr8() && low_bits)
		v ^= 1;
	sfmt(what, sizeof(what), "cr8 <- %lx", v);
	write_cr8(v);
	return 0;
}
static u64 op_eoi(u64 base)
{
	sfmt(what, sizeof(what), "eoi");
	if (!(base & APIC_BASE_EN))
		return 0;
	if (base & APIC_BASE_EXTD)
		return wrmsr_catch(0x80B, 0) ? 0xFA000000ul | GP_CAUGHT : 0;
	xapic_write(APIC_EOI, 0);
	return 0;
}
static u32 ioapic_value(u32 sel)
{
	u32 v = any32();
	if (sel >= 0x10 && sel < 0x10 + 2 * IOAPIC_PINS) {
		if (sel & 1) {
			if (two_cpus && chance(2))
				v = destination(false) << 24 | (v & 0xFFFFFF);
			v &= ~0x00FE0000u; /* bits 55:49, the extended destination ID (see the header) */
			if (v >> 24 == 0xFF)
				v &= ~0x01000000u; /* not the broadcast destination (see the header) */
		} else
			v = shared_redirection((sel - 0x10) / 2, v);
	}
	return v;
}
/* Pin's redirection entry, low and high word (IOREGSEL kept). */
static void ioapic_entry(u32 pin, u32 *lo, u32 *hi)
{
	u32 sel = ioregsel_read();
	ioregsel_write(0x10 + 2 * pin);
	*lo = iowin_read();
	ioregsel_write(0x11 + 2 * pin);
	*hi = iowin_read();
	ioregsel_write(sel);
}
/* An IOWIN write of `v` to register `sel`, made physical where the entry would differ by design. */
static void iowin_write_shared(u32 sel, u32 v)
{
	if (sel >= 0x10 && sel < 0x10 + 2 * IOAPIC_PINS) {
		u32 lo, hi;
		ioapic_entry((sel - 0x10) / 2, &lo, &hi);
		if (sel & 1 ? entry_differs_by_design(lo, v) : entry_differs_by_design(v, hi)) {
			if (sel & 1) { /* the high word stays: the low word is written physical instead */
				ioregsel_write(--sel);
				v = lo;
			}
			v &= ~(u32)APIC_DEST_LOGICAL;
		}
	}
	sfmt(what, sizeof(what), "iowin %x <- %x", sel, v);
	iowin_write(v);
}
/* The pc-testdev lines driven high (bit n: line n). A line only ever changes level: KVM re-evaluates a line
 * driven to the level it has, irqvm forwards only changes (docs/irqchip-modes.md). */
static u32 lines_high;
static u64 op_ioapic(void)
{
	switch (below(5)) {
	case 0: {
		u32 sel = chance(4) ? (u32)rnd() : below(0x10 + 2 * IOAPIC_PINS + 8);
		sfmt(what, sizeof(what), "ioregsel <- %x", sel);
		ioregsel_write(sel);
		return 0;
	}
	case 1: case 2: {
		u32 sel = ioregsel_read() & 0xFF;
		iowin_write_shared(sel, ioapic_value(sel));
		return 0;
	}
	default: {
		u32 pin = chance(2) ? 16 + below(8) : 3 + below(13);
		if (chance(14))
			pin = 1;
		bool high = (lines_high >> pin) & 1, pulse = !high && chance(2);
		u32 lo, hi;
		ioapic_entry(pin, &lo, &hi);
		if (entry_differs_by_design(lo, hi)) {
			sfmt(what, sizeof(what), "line %u kept (see the header)", pin);
			return 0;
		}
		sfmt(what, sizeof(what), "line %u %s", pin, high ? "low" : pulse ? "pulse" : "high");
		testdev_set_irq(pin, !high);
		if (pulse)
			testdev_set_irq(pin, false);
		else
			lines_high ^= 1u << pin;
		return 0;
	}
	}
}
/* The 8259 pair's command and data ports and the ELCRs: any byte written, any of them read. */
static u64 op_pic(void)
{
	static const u16 ports[] = { 0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1 };
	u16 port = ports[below(6)];
	if (chance(3)) {
		sfmt(what, sizeof(what), "in %x", port);
		return inb(port);
	}
	u8 v = (u8)rnd();
	if ((port == 0x20 || port == 0xA0) && chance(3))
		v = (u8)(0x10 | (rnd() & 0x0F)); /* ICW1: an initialisation sequence follows */
	sfmt(what, sizeof(what), "out %x <- %x", port, v);
	outb(port, v);
	return 0;
}

/* With two CPUs: an IPI shaped to arrive somewhere (fixed mostly, NMI, a level trigger, the INIT level
 * de-assert; physical or logical; a shorthand at times) to a destination that matters. */
static u64 op_ipi(u64 base)
{
	static const u32 modes[] = { 0x000, 0x000, 0x000, 0x400, 0x100, 0x200, 0x8500, 0x600 };
	bool x2 = (base & APIC_BASE_EXTD) != 0;
	u32 lo = (32 + below(224)) | modes[below(sizeof(modes) / sizeof(modes[0]))];
	if (chance(3))
		lo |= APIC_DEST_LOGICAL;
	if (chance(5))
		lo |= 0x8000 | (chance(2) ? 0x4000 : 0);
	if (chance(5))
		lo |= below(4) << 18;
	lo = shared_icr(lo);
	u32 dest = x2 ? unmixed(true, destination(true)) : unmixed(false, destination(false) << 24);
	u32 id = x2 ? dest : dest >> 24;
	lo = shared_nmi(lo, id);
	if (!(base & APIC_BASE_EN)) {
		sfmt(what, sizeof(what), "ipi %x to %x (apic disabled)", lo, id);
		return 0;
	}
	return write_icr(x2, dest, lo);
}

static u64 run_op(void)
{
	u64 base = rdmsr(APIC_BASE_MSR);
	if (two_cpus && chance(6))
		return op_ipi(base);
	u32 pick = below(100);
	if (pick < 22)
		return op_lapic_write(base);
	if (pick < 32)
		return op_lapic_read(base);
	if (pick < 38)
		return op_apic_base(base);
	if (pick < 41)
		return op_tsc_deadline(base);
	if (pick < 45)
		return op_cr8(base);
	if (pick < 52)
		return op_eoi(base);
	if (pick < 80)
		return op_ioapic();
	return op_pic();
}

/* ---- two CPUs in lock step ------------------------------------------------------------------------------- */
/* CPU 1 runs one piece of work at a time when CPU 0 asks and waits for it, so both CPUs' operations and
 * reads happen in one order in every mode. */
static volatile u32 work_asked, work_done, cpu1_ready;
static u64 (*volatile cpu1_work)(void);
static volatile u64 cpu1_result;
static u64 op_number;

static void serve(void *unused)
{
	(void)unused;
	/* The kick that started this call may still wait in IRR (KVM injects it at an exit of its choosing):
	 * take it with interrupts on, so that CPU 1 starts from an empty IRR in every mode. */
	while (apic_vector_bit(APIC_IRR, KICK_VECTOR) || apic_vector_bit(APIC_ISR, KICK_VECTOR))
		cpu_relax();
	cli();
	apic_write(APIC_TDCR, 0xA); /* as on CPU 0 (see the header) */
	apic_base_of[1] = rdmsr(APIC_BASE_MSR);
	WRITE_ONCE(cpu1_ready, 1);
	for (;;) {
		u32 asked = READ_ONCE(work_asked);
		if (asked == work_done) {
			cpu_relax();
			continue;
		}
		cpu1_result = cpu1_work();
		barrier();
		WRITE_ONCE(work_done, asked);
	}
}
/* `work` on `cpu` (0 or 1), its result once it has returned. */
static u64 on_cpu(u32 cpu, u64 (*work)(void))
{
	if (cpu == 0)
		return work();
	cpu1_work = work;
	barrier();
	u32 asked = work_asked + 1;
	WRITE_ONCE(work_asked, asked);
	if (!wait_eq(&work_done, asked, 20000))
		panic("cpu 1 did not finish its part of operation %lu", op_number);
	barrier();
	return cpu1_result;
}
/* Starts the APs; CPU 1 serves on_cpu, the others park with interrupts off. */
static void start_cpus(void)
{
	check(smp_start_all() == ncpus, "all cpus online", "%u CPUs", ncpus);
	for (u32 c = 2; c < ncpus; c++)
		smp_call_async(c, smp_park_cli_hlt, NULL);
	check(smp_call_async(1, serve, NULL) && wait_eq(&cpu1_ready, 1, WAIT_MS), "cpu 1 serves",
	      "cpu 1 did not start");
	two_cpus = true;
}

void guest_main(void)
{
	seed = cmdline_u64("seed", 1);
	ops = cmdline_u64("ops", 200);
	dump = cmdline_u64("dump", 0);
	rng_state = 0x9E3779B97F4A7C15ul ^ (seed * 0xBF58476D1CE4E5B9ul);
	if (!rng_state)
		rng_state = 1;
	cli();
	pic_disable();
	ioapic_mask_all();
	for (u32 pin = 16; pin < IOAPIC_PINS; pin++) /* PCI pins active low from the start (see the header) */
		ioapic_set_entry(pin, IOAPIC_MASKED | IOAPIC_ACTIVE_LOW);
	u32 a, b, c, d;
	cpuid(0x80000008, 0, &a, &b, &c, &d);
	max_phys_addr = a & 0xFF;
	if (max_phys_addr < 36 || max_phys_addr > 52)
		max_phys_addr = 36;
	apic_use_x2apic(false);
	apic_enable();
	apic_write(APIC_TDCR, 0xA); /* divide by 128 from the start (see the header) */
	irq_set_handler(2, on_nmi);
	apic_base_of[0] = rdmsr(APIC_BASE_MSR);
	if (ncpus > 1)
		start_cpus();
	printf("regdiff seed %lu ops %lu cpus %u\n", seed, ops, two_cpus ? 2 : 1);
	u64 i;
	for (i = 0; i < ops; i++) {
		op_number = i;
		u32 cpu = two_cpus && chance(3);
		u64 result = on_cpu(cpu, run_op);
		settle();
		if (dump)
			printf("%04lu %s%s -> %lx |", i, cpu ? "cpu1 " : "", what, result);
		u32 state0 = (u32)note_cpu0(), state1 = two_cpus ? (u32)on_cpu(1, note_cpu1) : 0;
		if (dump)
			printf("\n");
		else if (two_cpus)
			printf("%04lu %s%s -> %lx s=%08x/%08x\n", i, cpu ? "cpu1 " : "", what, result, state0, state1);
		else
			printf("%04lu %s -> %lx s=%08x\n", i, what, result, state0);
	}
	check(i == ops, "regdiff ran every op", "%lu of %lu", i, ops);
	done();
}
