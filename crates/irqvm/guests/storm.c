/* storm: every CPU sends IPIS_PER_CPU fixed IPIs round-robin to the other CPUs while device lines fire.
 * The vector carries the sender (V_STORM + sender), and a sender waits until its previous IPI to a destination
 * arrived before sending the next one there, so no two IPIs can merge in one IRR bit: every IPI sent must be
 * received exactly once. Device interrupts: IOAPIC pins 10 and 11 (edge, ISA lines of pc-testdev) go to CPU 0
 * and to the last CPU. The guest pulses line 11 itself DEV_PULSES times, each after the previous one arrived, so
 * it must count exactly DEV_PULSES on V_DEV11.
 *
 * Line 10 belongs to a VMM test's host thread (under QEMU nobody drives it and the guest never waits for it).
 * The guest and that thread share `host_link`, whose address the "STORM: start" line prints:
 *   - the guest counts every V_DEV10 interrupt in `dev10`;
 *   - the host sets `busy` = 1, then reads `stop`; if it is still 0 it pulses line 10, waits until `dev10`
 *     grew, and sets `busy` = 0 again, so at most one host edge is ever outstanding and none can merge in IRR;
 *   - the guest ends the host's window by setting `stop` = 1 (a locked exchange), then waits while `busy` is 1.
 * Each side writes its own flag before reading the other's (with a full fence between), so either the host sees
 * `stop` and does not pulse, or the guest sees `busy` and waits for that pulse to be counted: the VMM test can
 * then require dev10 == the number of pulses it sent. Totals are printed as
 *   COUNT: ipi_sent=S ipi_received=R dev=D dev10=D10 dev11=D11
 * PASS if S == R and D11 == DEV_PULSES. */
#include "guest.h"

#define IPIS_PER_CPU 200
#define DEV_PULSES 20
#define V_STORM 0x90   /* 0x90 + sender cpu */
#define V_DEV10 0xA0
#define V_DEV11 0xA1
#define STORM_MS 30000 /* bound for the whole storm */

static volatile u32 sent[MAX_CPUS], received[MAX_CPUS];
static volatile u32 sent_to[MAX_CPUS][MAX_CPUS];   /* [src][dst] */
static volatile u32 recv_from[MAX_CPUS][MAX_CPUS]; /* [dst][src] */
static volatile u32 dev_count, dev11, stuck[MAX_CPUS], finished;
static volatile u32 go;
/* See the header: written by the guest (stop, dev10) and by a VMM test's host thread (busy). */
static volatile struct {
	u32 stop, busy, dev10;
} host_link;

static void storm_handler(struct irq_frame *f, u32 cpu)
{
	u32 src = (u32)f->vector - V_STORM;
	if (src < MAX_CPUS)
		recv_from[cpu][src]++;
	received[cpu]++;
	apic_eoi();
}
static void dev10_handler(struct irq_frame *f, u32 cpu)
{
	atomic_inc(&host_link.dev10);
	atomic_inc(&dev_count);
	apic_eoi();
}
static void dev11_handler(struct irq_frame *f, u32 cpu)
{
	atomic_inc(&dev11);
	atomic_inc(&dev_count);
	apic_eoi();
}

static void storm(void *unused)
{
	u32 me = this_cpu();
	wait_nonzero(&go, WAIT_MS);
	u64 t0 = rdtsc(), limit = ms_to_tsc(STORM_MS);
	for (u32 i = 0; i < IPIS_PER_CPU; i++) {
		u32 dst = (me + 1 + i % (ncpus - 1)) % ncpus;
		/* One outstanding IPI per (source, destination) pair. */
		while (READ_ONCE(recv_from[dst][me]) != sent_to[me][dst]) {
			if (rdtsc() - t0 > limit) {
				stuck[me] = 1;
				atomic_inc(&finished);
				return;
			}
			cpu_relax();
		}
		sent_to[me][dst]++;
		sent[me]++;
		apic_send_fixed(cpu_to_apic_id(dst), V_STORM + me);
	}
	atomic_inc(&finished);
}

/* True once every IPI sent has been received (per source and destination). */
static bool all_ipis_landed(void *unused)
{
	for (u32 src = 0; src < ncpus; src++)
		for (u32 dst = 0; dst < ncpus; dst++)
			if (READ_ONCE(recv_from[dst][src]) != sent_to[src][dst])
				return false;
	return true;
}

void guest_main(void)
{
	platform_init(false);
	if (ncpus < 2) {
		skip("ipi storm", "only %u CPU", ncpus);
		return;
	}
	if (!check(smp_start_all() == ncpus, "all cpus online", "not all APs came up"))
		return;
	for (u32 c = 0; c < ncpus; c++)
		irq_set_handler(V_STORM + c, storm_handler);
	irq_set_handler(V_DEV10, dev10_handler);
	irq_set_handler(V_DEV11, dev11_handler);
	ioapic_set_entry(10, (u64)cpu_to_apic_id(0) << 56 | V_DEV10);
	ioapic_set_entry(11, (u64)cpu_to_apic_id(ncpus - 1) << 56 | V_DEV11);
	/* A VMM test may start pulsing line 10 here. */
	printf("STORM: start host_link=%p busy@+4 stop@+0 dev10@+8\n", (void *)&host_link);

	bool calls = true;
	for (u32 c = 1; c < ncpus; c++)
		calls &= smp_call_async(c, storm, NULL);
	check(calls, "storm started on every ap", "an smp_call failed");
	WRITE_ONCE(go, 1);
	/* CPU 0 pulses line 11 while the APs storm, then joins the storm itself. */
	u32 pulses = 0;
	for (u32 p = 0; p < DEV_PULSES; p++) {
		u32 before = irq_count[ncpus - 1][V_DEV11];
		testdev_set_irq(11, 1);
		testdev_set_irq(11, 0);
		pulses += wait_ge(&irq_count[ncpus - 1][V_DEV11], before + 1, WAIT_MS);
	}
	storm(NULL);
	bool all = wait_eq(&finished, ncpus, STORM_MS);
	for (u32 c = 1; c < ncpus; c++)
		smp_wait(c, WAIT_MS);
	/* The last IPI of each pair is not waited for by its sender: wait until every one landed. A fixed delay
	 * is not enough: KVM's in-kernel LAPIC on a software KVM delivers a pending IPI only at the target's next
	 * exit, which a loaded host can put off for tens of milliseconds. A lost IPI still fails below, after
	 * WAIT_MS. */
	bool landed = wait_until(all_ipis_landed, NULL, WAIT_MS);
	/* Close the host's window (stop, then read busy: see the header); IF=1, so its last pulse is taken. */
	atomic_xchg(&host_link.stop, 1);
	bool host_quiet = wait_eq(&host_link.busy, 0, WAIT_MS);
	printf("STORM: end\n");
	ioapic_set_entry(10, IOAPIC_MASKED);
	ioapic_set_entry(11, IOAPIC_MASKED);

	u32 s = 0, r = 0, stuck_cpus = 0;
	for (u32 c = 0; c < ncpus; c++) {
		printf("COUNT: cpu %u sent=%u received=%u\n", c, sent[c], received[c]);
		s += sent[c];
		r += received[c];
		stuck_cpus += stuck[c];
	}
	printf("COUNT: ipi_sent=%u ipi_received=%u dev=%u dev10=%u dev11=%u\n", s, r, dev_count, host_link.dev10,
	       dev11);
	check(all && stuck_cpus == 0, "every cpu finished its storm", "%u finished, %u stuck", finished,
	      stuck_cpus);
	check(s == ncpus * IPIS_PER_CPU, "every ipi was sent", "sent %u of %u", s, ncpus * IPIS_PER_CPU);
	check(s == r && landed, "ipis sent == received", "sent %u received %u", s, r);
	check(pulses == DEV_PULSES && dev11 == DEV_PULSES, "device pulses delivered exactly once during the storm",
	      "%u of %u pulses arrived, %u interrupts on line 11", pulses, DEV_PULSES, dev11);
	check(host_quiet, "host line 10 quiet at the end", "the host's last pulse was never counted");
}
