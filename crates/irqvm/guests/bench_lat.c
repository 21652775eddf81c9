/* bench_lat: interrupt delivery latencies, one workload after the other (see bench.h for the output):
 *   selfipi         self-IPI by the ICR shorthand: send, take, EOI, back in the loop
 *   selfipi_tpr     the same held back by TPR = 0xF0 and released by lowering the TPR (raise, send, lower, take)
 *   irq_guest       pc-testdev line 10 raised by the guest -> IOAPIC pin 10 (edge) -> its handler
 *   irq_level       the same line, level-triggered: held until the handler lowers it, EOI broadcast to the IOAPIC
 *   timer_oneshot   LAPIC one-shot timer: programmed (TMICT write) to handler, minus the programmed interval
 *   timer_deadline  TSC-deadline timer: handler TSC minus the deadline
 *   timer_sleep     the same with the deadline 1 ms ahead: longer than any halt poll (KVM's default 200 us, irqvm's),
 *                   so the halted vCPU sleeps and its timer wakes it, as an idle Linux vCPU's tick does
 *   timer_spin      TSC-deadline timer 100 us ahead while the guest spins with interrupts enabled (a busy vCPU's
 *                   tick): handler TSC minus the deadline
 *   timer_deadline_expired  TSC deadline written already in the past (the TSC read just before the WRMSR), with
 *                   interrupts enabled: handler TSC minus the TSC read before the write
 *   ipi_halted      IPI round trip CPU 0 -> CPU 1 -> CPU 0, both halted between IPIs (needs 2 CPUs)
 *   ipi_spin        the same with both CPUs spinning with interrupts enabled
 *   ipi_halted_pveoi  ipi_halted with both handlers ending their interrupt through KVM's paravirtual EOI (CPUID
 *                   0x40000001 EAX bit 6, MSR_KVM_PV_EOI_EN: clear the flag the hypervisor set instead of writing
 *                   the EOI register), as Linux does where the hypervisor offers it; skipped where it is not offered
 *   apic_read       one read of the local APIC's version register, interrupts off: what one exit to whoever emulates
 *                   the APIC costs (KVM's kernel in `kernel`/`split` and QEMU/KVM, irqvm's userspace in `user`)
 *   apic_write      the same for a write: an EOI with nothing in service (ignored: SDM vol. 3 §11.8.5)
 *   port_read       one read of the CMOS data port, interrupts off: what one exit to the VMM's userspace costs, in
 *                   every mode (the RTC is userspace's in irqvm and QEMU alike; a read, which KVM cannot coalesce as
 *                   QEMU has it coalesce writes of the CMOS index port)
 * Waits for halted delivery are bounded by the host's timeout; spinning waits by SPIN_WAIT_MS. */
#include "bench.h"

#define V_SELF 0x50
#define V_DEV 0x51
#define V_TIMER 0x52
#define V_PING 0x53
#define V_PONG 0x54
#define DEV_LINE 10
#define TIMER_NS 50000u /* programmed timer interval: 50 us */
#define SLEEP_NS 1000000u /* timer_sleep's interval: 1 ms */
#define SPIN_NS 100000u /* timer_spin's interval: 100 us */
#define START_PAUSE_MS 500

static volatile u64 handler_tsc;
static volatile u32 taken; /* interrupts taken by the workload's handler */

static void stamp_handler(struct irq_frame *f, u32 cpu)
{
	handler_tsc = rdtsc();
	taken++;
	apic_eoi();
}

/* Spins with interrupts enabled until `taken` passes `before` (bounded). */
static bool spin_until_taken(u32 before)
{
	u64 t0 = rdtsc(), limit = ms_to_tsc(SPIN_WAIT_MS);
	while (READ_ONCE(taken) == before)
		if (rdtsc() - t0 > limit)
			return false;
	return true;
}

/* Halts with interrupts enabled until `taken` passes `before`: `sti; hlt` cannot lose a wake-up. */
static void halt_until_taken(u32 before)
{
	cli();
	while (READ_ONCE(taken) == before) {
		sti_hlt();
		cli();
	}
	sti();
}

static void self_ipi(bool tpr)
{
	const char *name = tpr ? "selfipi_tpr" : "selfipi";
	u32 n = bench_iterations(), sent = 0;
	irq_set_handler(V_SELF, stamp_handler);
	taken = 0;
	for (u32 i = 0; i < BENCH_WARMUP + n; i++) {
		if (i == BENCH_WARMUP) {
			bench_begin(name);
			taken = 0;
		}
		u32 before = taken;
		u64 t0 = rdtsc();
		if (tpr)
			apic_write(APIC_TPR, 0xF0);
		apic_icr_write(0, APIC_SH_SELF | V_SELF);
		if (tpr)
			apic_write(APIC_TPR, 0);
		bool ok = spin_until_taken(before);
		u64 t1 = rdtsc();
		if (i >= BENCH_WARMUP) {
			sent++;
			if (ok)
				record(t1 - t0);
		}
	}
	bench_end(name);
	bench_report(name, sent, taken, taken, 0);
}

static void irq_guest(void)
{
	u32 n = bench_iterations(), sent = 0;
	irq_set_handler(V_DEV, stamp_handler);
	ioapic_set_entry(DEV_LINE, (u64)cpu_to_apic_id(0) << 56 | V_DEV);
	taken = 0;
	for (u32 i = 0; i < BENCH_WARMUP + n; i++) {
		if (i == BENCH_WARMUP) {
			bench_begin("irq_guest");
			taken = 0;
		}
		u32 before = taken;
		u64 t0 = rdtsc();
		testdev_set_irq(DEV_LINE, 1);
		bool ok = spin_until_taken(before);
		testdev_set_irq(DEV_LINE, 0);
		if (i >= BENCH_WARMUP) {
			sent++;
			if (ok)
				record(handler_tsc - t0);
		}
	}
	bench_end("irq_guest");
	ioapic_set_entry(DEV_LINE, IOAPIC_MASKED);
	bench_report("irq_guest", sent, taken, taken, 0);
}

/* Level-triggered: the line stays up until the handler lowers it (pc-testdev), before its EOI, whose broadcast
 * clears the entry's Remote IRR at the IOAPIC (SDM vol. 3 §11.8.5; 82093AA datasheet, redirection table). */
static volatile u32 level_raised, level_extra;

/* Counts a delivery only for a raise not yet taken; any other delivery (KVM's in-kernel IOAPIC was seen to deliver
 * a few more under load, QEMU/KVM alike) is counted apart and reported, not hidden. */
static void level_handler(struct irq_frame *f, u32 cpu)
{
	handler_tsc = rdtsc();
	if (level_raised) {
		level_raised = 0;
		taken++;
	} else {
		level_extra++;
	}
	testdev_set_irq(DEV_LINE, 0);
	apic_eoi();
}

static void irq_level(void)
{
	u32 n = bench_iterations(), sent = 0;
	irq_set_handler(V_DEV, level_handler);
	ioapic_set_entry(DEV_LINE, (u64)cpu_to_apic_id(0) << 56 | IOAPIC_LEVEL | V_DEV);
	taken = 0;
	for (u32 i = 0; i < BENCH_WARMUP + n; i++) {
		if (i == BENCH_WARMUP) {
			bench_begin("irq_level");
			taken = 0;
		}
		u32 before = taken;
		u64 t0 = rdtsc();
		level_raised = 1;
		testdev_set_irq(DEV_LINE, 1);
		bool ok = spin_until_taken(before);
		if (i >= BENCH_WARMUP) {
			sent++;
			if (ok)
				record(handler_tsc - t0);
		}
	}
	bench_end("irq_level");
	if (level_extra)
		printf("NOTE: irq_level: %u deliveries more than raises\n", level_extra);
	ioapic_set_entry(DEV_LINE, IOAPIC_MASKED);
	check(!(ioapic_get_entry(DEV_LINE) & IOAPIC_REMOTE_IRR), "irq_level: Remote IRR clear after the last EOI",
	      "entry %lx", ioapic_get_entry(DEV_LINE));
	bench_report("irq_level", sent, taken, taken, 0);
}

/* One timer workload: one-shot or TSC-deadline, `interval_ns` ahead, the guest halted (or spinning with
 * interrupts enabled when `spin`) until its handler ran. */
static void timer(const char *name, bool deadline, u32 interval_ns, bool spin)
{
	if (deadline && !cpu_has_tsc_deadline()) {
		skip(name, "CPUID.1:ECX[24] is clear");
		return;
	}
	u32 n = bench_iterations(), sent = 0;
	u64 interval = ms_to_tsc(1) * interval_ns / 1000000u;
	irq_set_handler(V_TIMER, stamp_handler);
	apic_write(APIC_TDCR, 0xB); /* divide by 1: one tick per ns */
	taken = 0;
	for (u32 i = 0; i < BENCH_WARMUP + n; i++) {
		if (i == BENCH_WARMUP) {
			bench_begin(name); /* the pause uses the timer: program it again afterwards */
			apic_write(APIC_TDCR, 0xB);
			taken = 0;
		}
		u32 before = taken;
		u64 due;
		if (deadline) {
			apic_write(APIC_LVT_TIMER, APIC_TIMER_TSCDEADLINE | V_TIMER);
			due = rdtsc() + interval;
			wrmsr(MSR_TSC_DEADLINE, due);
		} else {
			apic_write(APIC_LVT_TIMER, APIC_TIMER_ONESHOT | V_TIMER);
			due = rdtsc();
			apic_write(APIC_TMICT, interval_ns);
		}
		bool ok = true;
		if (spin)
			ok = spin_until_taken(before);
		else
			halt_until_taken(before);
		if (i >= BENCH_WARMUP) {
			sent++;
			if (ok)
				record(handler_tsc > due ? handler_tsc - due : 0);
		}
	}
	bench_end(name);
	apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	bench_report(name, sent, taken, taken, deadline ? 0 : interval_ns);
}

/* A TSC deadline that has already passed when it is written fires at once (SDM vol. 3 §11.5.4.1: "if software
 * writes a value that is less than the current TSC, the timer generates an interrupt immediately"). */
static void timer_deadline_expired(void)
{
	const char *name = "timer_deadline_expired";
	if (!cpu_has_tsc_deadline()) {
		skip(name, "CPUID.1:ECX[24] is clear");
		return;
	}
	u32 n = bench_iterations(), sent = 0;
	irq_set_handler(V_TIMER, stamp_handler);
	taken = 0;
	apic_write(APIC_LVT_TIMER, APIC_TIMER_TSCDEADLINE | V_TIMER);
	for (u32 i = 0; i < BENCH_WARMUP + n; i++) {
		if (i == BENCH_WARMUP) {
			bench_begin(name); /* the pause uses the timer in one-shot mode: back to TSC-deadline */
			apic_write(APIC_LVT_TIMER, APIC_TIMER_TSCDEADLINE | V_TIMER);
			taken = 0;
		}
		u32 before = taken;
		u64 t0 = rdtsc();
		wrmsr(MSR_TSC_DEADLINE, t0);
		bool ok = spin_until_taken(before);
		if (i >= BENCH_WARMUP) {
			sent++;
			if (ok)
				record(handler_tsc - t0);
		}
	}
	bench_end(name);
	apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	bench_report(name, sent, taken, taken, 0);
}

/* ---- KVM's paravirtual EOI, as Linux's kvm_guest_apic_eoi_write uses it ---- */
static volatile u32 pv_eoi_word[MAX_CPUS] __attribute__((aligned(4)));
static volatile bool pv_eoi_on;

/* This CPU's word on or off (run on each CPU through smp_call). */
static void pv_eoi_set(void *on) { pv_eoi_enable(on ? &pv_eoi_word[this_cpu()] : NULL); }

/* The EOI of an interrupt handler on `cpu` (the dispatcher's: this_cpu()'s division would cost the emulated
 * guest as much as the check): the flag if the hypervisor set it, else the register write. */
static void handler_eoi(u32 cpu)
{
	if (!pv_eoi_on || !pv_eoi_take(&pv_eoi_word[cpu]))
		apic_eoi();
}

/* ---- IPI round trips between CPU 0 and CPU 1 ---- */
static volatile u32 pings, stop_spinning;

static void ping_handler(struct irq_frame *f, u32 cpu)
{
	pings++;
	handler_eoi(cpu);
	apic_send_fixed(cpu_to_apic_id(0), V_PONG);
}

static void pong_handler(struct irq_frame *f, u32 cpu)
{
	handler_tsc = rdtsc();
	taken++;
	handler_eoi(cpu);
}

static void spin_on_ap(void *unused)
{
	sti();
	while (!READ_ONCE(stop_spinning))
		cpu_relax();
}

static void ipi_round_trips(bool spin, bool pv_eoi)
{
	const char *name = spin ? "ipi_spin" : pv_eoi ? "ipi_halted_pveoi" : "ipi_halted";
	if (ncpus < 2) {
		skip(name, "needs 2 CPUs, has %u", ncpus);
		return;
	}
	if (pv_eoi && !cpu_has_kvm_pv_eoi()) {
		skip(name, "the hypervisor offers no PV EOI");
		return;
	}
	if (pv_eoi) {
		pv_eoi_set((void *)1);
		if (!smp_call(1, pv_eoi_set, (void *)1)) {
			fail(name, "CPU 1 did not take the call");
			return;
		}
		pv_eoi_on = true;
	}
	u32 n = bench_iterations(), sent = 0;
	irq_set_handler(V_PING, ping_handler);
	irq_set_handler(V_PONG, pong_handler);
	stop_spinning = 0;
	if (spin && !smp_call_async(1, spin_on_ap, NULL)) {
		fail(name, "CPU 1 did not take the call");
		return;
	}
	taken = pings = 0;
	for (u32 i = 0; i < BENCH_WARMUP + n; i++) {
		if (i == BENCH_WARMUP) {
			bench_begin(name);
			taken = pings = 0;
		}
		u32 before = taken;
		u64 t0 = rdtsc();
		apic_send_fixed(cpu_to_apic_id(1), V_PING);
		bool ok = true;
		if (spin)
			ok = spin_until_taken(before);
		else
			halt_until_taken(before);
		u64 t1 = rdtsc();
		if (i >= BENCH_WARMUP) {
			sent++;
			if (ok)
				record(t1 - t0);
		}
	}
	bench_end(name);
	WRITE_ONCE(stop_spinning, 1);
	if (spin)
		smp_wait(1, WAIT_MS);
	if (pv_eoi) {
		pv_eoi_on = false;
		pv_eoi_set(NULL);
		smp_call(1, pv_eoi_set, NULL);
	}
	bench_report(name, sent, taken, taken + pings, 0);
}

/* ---- What one trapped access costs: the unit of the exits each workload above takes (docs/benchmarks.md, "The
 * floor, measured") ---- */
#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define CMOS_STATUS_D 0x0D /* a read-only register (MC146818A): reading it changes nothing */

static u32 read_apic_version(void) { return apic_read(APIC_VERSION); }
static u32 write_apic_eoi(void)
{
	apic_eoi();
	return 0;
}
static u32 read_cmos_data(void) { return inb(CMOS_DATA); }

/* Times `n` single accesses by `access`, each between two TSC reads, with interrupts off so that nothing but the
 * access's own exit lands between them. Every access counts as one "interrupt" of the phase, so the cost table's
 * per-interrupt figures are per access. */
static void access_cost(const char *name, u32 (*access)(void))
{
	u32 n = bench_iterations(), sent = 0;
	volatile u32 sink = 0;
	for (u32 i = 0; i < BENCH_WARMUP + n; i++) {
		if (i == BENCH_WARMUP)
			bench_begin(name);
		u64 flags = read_flags();
		cli();
		u64 t0 = rdtsc();
		sink += access();
		u64 t1 = rdtsc();
		write_flags(flags);
		if (i >= BENCH_WARMUP) {
			sent++;
			record(t1 - t0);
		}
	}
	bench_end(name);
	(void)sink;
	bench_report(name, sent, sent, sent, 0);
}

static void access_costs(void)
{
	access_cost("apic_read", read_apic_version);
	access_cost("apic_write", write_apic_eoi);
	outb(CMOS_INDEX, CMOS_STATUS_D); /* NMI left enabled (bit 7 clear) */
	access_cost("port_read", read_cmos_data);
}

void guest_main(void)
{
	platform_init(false);
	if (ncpus >= 2)
		check(smp_start_all() == ncpus, "all cpus online", "not all APs came up");
	/* The host attaches its syscall counter (perf) at the first line printed: give it time before the first
	 * workload. */
	quiet_pause(START_PAUSE_MS);
	self_ipi(false);
	self_ipi(true);
	irq_guest();
	irq_level();
	timer("timer_oneshot", false, TIMER_NS, false);
	timer("timer_deadline", true, TIMER_NS, false);
	timer("timer_sleep", true, SLEEP_NS, false);
	timer("timer_spin", true, SPIN_NS, true);
	timer_deadline_expired();
	ipi_round_trips(false, false);
	ipi_round_trips(true, false);
	ipi_round_trips(false, true);
	access_costs();
}
