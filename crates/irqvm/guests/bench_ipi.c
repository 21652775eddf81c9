/* bench_ipi: IPIs among all vCPUs, run at 2, 4, 8 and 16 vCPUs (see bench.h for the output); <N> = vCPU count:
 *   ipi_storm_<N>      many to one: every AP sends fixed IPIs to CPU 0 at once, each AP its own vector and never
 *                      more than one outstanding (the next once CPU 0's handler took the previous: IRR would merge
 *                      them); CPU 0 halts between them. One sample per round: cycles per interrupt CPU 0 took
 *                      (the inverse of the throughput), ROUNDS rounds of n/ROUNDS IPIs per AP.
 *   ipi_broadcast_<N>  one to all: CPU 0 sends a fixed IPI with the all-excluding-self shorthand to the halted APs
 *                      and waits until every one took it. One sample per broadcast: cycles from the ICR write to the
 *                      last AP's handler.
 * On 1 vCPU both are skipped. */
#include "bench.h"

#define V_STORM 0x60 /* + AP index (up to 0x6F) */
#define V_BCAST 0x58
#define ROUNDS 10

static volatile u32 storm_taken;              /* CPU 0's count, all APs */
static volatile u32 storm_acked[MAX_CPUS];    /* per AP: its IPIs CPU 0 took */
static volatile u32 storm_per_ap, storm_go, storm_done;
static volatile u64 bcast_tsc[MAX_CPUS];
static volatile u32 bcast_taken;

static void storm_handler(struct irq_frame *f, u32 cpu)
{
	u32 ap = ((u32)f->vector & 255) - V_STORM;
	if (ap < MAX_CPUS)
		storm_acked[ap]++;
	storm_taken++;
	apic_eoi();
}

/* On each AP: send `storm_per_ap` IPIs to CPU 0, one at a time. */
static void storm_sender(void *unused)
{
	u32 me = this_cpu(), target = cpu_to_apic_id(0);
	while (!READ_ONCE(storm_go))
		cpu_relax();
	u64 t0 = rdtsc(), limit = ms_to_tsc(WAIT_MS);
	for (u32 i = 0; i < storm_per_ap; i++) {
		u32 before = READ_ONCE(storm_acked[me]);
		apic_send_fixed(target, V_STORM + me);
		while (READ_ONCE(storm_acked[me]) == before && rdtsc() - t0 < limit)
			cpu_relax();
	}
	atomic_inc(&storm_done);
}

static void ipi_storm(void)
{
	char name[32];
	sfmt(name, sizeof name, "ipi_storm_%u", ncpus);
	u32 n = bench_iterations();
	u32 per_ap = n / ROUNDS ? n / ROUNDS : 1, aps = ncpus - 1, sent = 0;
	for (u32 c = 1; c < ncpus; c++)
		irq_set_handler(V_STORM + c, storm_handler);
	storm_per_ap = per_ap;
	storm_taken = 0;
	for (u32 r = 0; r < ROUNDS + 1; r++) {
		if (r == 1) /* round 0 warms up */
			bench_begin(name);
		storm_go = 0;
		storm_done = 0;
		for (u32 c = 1; c < ncpus; c++)
			storm_acked[c] = 0;
		u32 base = storm_taken;
		for (u32 c = 1; c < ncpus; c++)
			if (!smp_call_async(c, storm_sender, NULL))
				fail(name, "CPU %u did not take the call", c);
		u64 t0 = rdtsc(), limit = ms_to_tsc(WAIT_MS);
		WRITE_ONCE(storm_go, 1);
		cli();
		while (READ_ONCE(storm_taken) - base < aps * per_ap && rdtsc() - t0 < limit) {
			sti_hlt();
			cli();
		}
		sti();
		u64 t1 = rdtsc();
		for (u32 c = 1; c < ncpus; c++)
			smp_wait(c, WAIT_MS);
		if (r >= 1) {
			sent += aps * per_ap;
			record((t1 - t0) / (aps * per_ap));
		}
		if (r == 0)
			storm_taken = 0;
	}
	bench_end(name);
	bench_report(name, sent, storm_taken, storm_taken, 0);
}

static void bcast_handler(struct irq_frame *f, u32 cpu)
{
	bcast_tsc[cpu] = rdtsc();
	atomic_inc(&bcast_taken);
	apic_eoi();
}

static void ipi_broadcast(void)
{
	char name[32];
	sfmt(name, sizeof name, "ipi_broadcast_%u", ncpus);
	u32 n = bench_iterations(), aps = ncpus - 1, sent = 0, counted = 0;
	irq_set_handler(V_BCAST, bcast_handler);
	for (u32 i = 0; i < BENCH_WARMUP + n; i++) {
		if (i == BENCH_WARMUP) {
			bench_begin(name);
			counted = 0;
		}
		bcast_taken = 0;
		u64 t0 = rdtsc(), limit = ms_to_tsc(WAIT_MS);
		apic_icr_write(0, APIC_SH_OTHERS | V_BCAST);
		while (READ_ONCE(bcast_taken) < aps && rdtsc() - t0 < limit)
			cpu_relax();
		u32 got = READ_ONCE(bcast_taken);
		u64 last = t0;
		for (u32 c = 1; c < ncpus; c++)
			if (bcast_tsc[c] > last)
				last = bcast_tsc[c];
		if (i >= BENCH_WARMUP) {
			sent += aps;
			counted += got;
			if (got == aps)
				record(last - t0);
		}
	}
	bench_end(name);
	bench_report(name, sent, counted, counted, 0);
}

void guest_main(void)
{
	platform_init(false);
	if (ncpus < 2) {
		skip("ipi_storm", "needs 2 CPUs, has %u", ncpus);
		skip("ipi_broadcast", "needs 2 CPUs, has %u", ncpus);
		return;
	}
	check(smp_start_all() == ncpus, "all cpus online", "not all APs came up");
	/* The host attaches its syscall counter (perf) at the first line printed: give it time. */
	quiet_pause(500);
	ipi_storm();
	ipi_broadcast();
}
