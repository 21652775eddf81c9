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
 * then require dev10 == the number of pulses it sent.
 *
 * Counting: each IPI is counted by one store, the receiving CPU's handler incrementing recv_from[dst][src]
 * (no other counter of received IPIs exists that could lag behind it), and the guest reads the counts only
 * once every pair's count matches what its sender sent (all_ipis_landed). If that never happens within
 * WAIT_MS, an IPI is missing: the guest prints every pair's counts (sent, taken by the interrupt entry,
 * counted by the handler), sets `dump_req` before `stop`, and after the host's window closed waits for
 * `dump_done`: a VMM test dumps each vCPU's local APIC (IRR, ISR) and pending events then, which shows
 * whether the missing IPI is still pending, in service, or gone; the guest then says whether it arrived after
 * all. Totals are printed as
 *   COUNT: ipi_sent=S ipi_received=R dev=D dev10=D10 dev11=D11 landed_us=L
 * (L: how long after the last sender finished the last IPI was counted), per pair as
 *   COUNT: ipi SRC->DST sent=N taken=T received=R
 * and, for each pair whose last IPI was not counted yet when the last sender finished, as
 *   COUNT: late ipi SRC->DST
 * PASS if S == R and D11 == DEV_PULSES. */
#include "guest.h"

#define IPIS_PER_CPU 200
#define DEV_PULSES 20
#define V_STORM 0x90   /* 0x90 + sender cpu */
#define V_DEV10 0xA0
#define V_DEV11 0xA1
#define STORM_MS 20000 /* bound for the whole storm, inside a VMM test's 30 s so that the report still comes */
#define PAIR_MS 10000  /* bound for one IPI to land before its pair's next: generous, since a VMM test that
			* snapshots and restores the storm adds the time between the two to the guest's TSC */

static volatile u32 sent[MAX_CPUS];                /* written by the sender only */
static volatile u32 sent_to[MAX_CPUS][MAX_CPUS];   /* [src][dst], written by src only */
static volatile u32 recv_from[MAX_CPUS][MAX_CPUS]; /* [dst][src], written by dst's handler only */
static volatile u32 dev_count, dev11, stuck[MAX_CPUS], finished;
static bool late[MAX_CPUS][MAX_CPUS]; /* [src][dst]: not landed when the last sender finished */
static volatile u32 go;
/* See the header: written by the guest (stop, dev10, dump_req) and by a VMM test's host thread (busy,
 * dump_done). */
static volatile struct {
	u32 stop, busy, dev10, dump_req, dump_done;
} host_link;

/* Runs with IF=0 (interrupt gate), so it never nests on its CPU: the plain increment is that CPU's alone. */
static void storm_handler(struct irq_frame *f, u32 cpu)
{
	u32 src = (u32)f->vector - V_STORM;
	if (src < MAX_CPUS)
		recv_from[cpu][src]++;
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

struct pair {
	u32 src, dst;
};

/* True once dst's handler counted every IPI src sent it. */
static bool pair_landed(void *arg)
{
	struct pair *p = arg;
	return READ_ONCE(recv_from[p->dst][p->src]) == sent_to[p->src][p->dst];
}

static void storm(void *unused)
{
	u32 me = this_cpu();
	wait_nonzero(&go, WAIT_MS);
	u64 t0 = rdtsc(), limit = ms_to_tsc(STORM_MS);
	for (u32 i = 0; i < IPIS_PER_CPU; i++) {
		struct pair pair = { me, (me + 1 + i % (ncpus - 1)) % ncpus };
		/* One outstanding IPI per (source, destination) pair. Each wait is bounded by PAIR_MS, inside the VMM
		 * test's 30 s: an IPI lost in the middle of the storm stops this sender (stuck) early enough for the
		 * report and the host's dump below. */
		if (!wait_until(pair_landed, &pair, PAIR_MS) || rdtsc() - t0 > limit) {
			stuck[me] = 1;
			atomic_inc(&finished);
			return;
		}
		sent_to[me][pair.dst]++;
		sent[me]++;
		apic_send_fixed(cpu_to_apic_id(pair.dst), V_STORM + me);
	}
	atomic_inc(&finished);
}

/* True once every IPI sent has been received (per source and destination). */
static bool all_ipis_landed(void *unused)
{
	for (u32 src = 0; src < ncpus; src++)
		for (u32 dst = 0; dst < ncpus; dst++)
			if (!pair_landed(&(struct pair){ src, dst }))
				return false;
	return true;
}

/* IPIs counted by dst's handler, from every source. */
static u32 received_by(u32 dst)
{
	u32 n = 0;
	for (u32 src = 0; src < ncpus; src++)
		n += recv_from[dst][src];
	return n;
}

/* Every pair's counts: sent, taken by the interrupt entry (irq_count), counted by the handler. */
static void print_pairs(const char *prefix)
{
	for (u32 src = 0; src < ncpus; src++)
		for (u32 dst = 0; dst < ncpus; dst++)
			if (src != dst)
				printf("%s ipi %u->%u sent=%u taken=%u received=%u\n", prefix, src, dst, sent_to[src][dst],
				       irq_count[dst][V_STORM + src], recv_from[dst][src]);
}

/* An IPI is missing after WAIT_MS: ask the host (before closing its window, see the header) to dump every
 * vCPU's interrupt state while the guest still waits. */
static void request_dump(void)
{
	printf("STORM: ipis missing after %u ms, asking the host for a dump\n", WAIT_MS);
	print_pairs("MISSING:");
	WRITE_ONCE(host_link.dump_req, 1);
}

/* After the host's window closed: wait for its dump (a host that does not dump, e.g. QEMU, just times out),
 * then say whether the missing IPIs arrived after all (the dump kicks every vCPU out of KVM_RUN, so an IPI
 * still pending in an IRR is taken at the next entry). */
static void report_after_dump(void)
{
	bool dumped = wait_eq(&host_link.dump_done, 1, WAIT_MS);
	bool arrived = wait_until(all_ipis_landed, NULL, WAIT_MS);
	printf("STORM: after the host's dump (%s): %s\n", dumped ? "dumped" : "no dump",
	       arrived ? "every missing ipi arrived late" : "ipis still missing");
	print_pairs("MISSING:");
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
	printf("STORM: start host_link=%p busy@+4 stop@+0 dev10@+8 dump_req@+12 dump_done@+16\n", (void *)&host_link);

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
	u64 t_done = rdtsc();
	for (u32 src = 0; src < ncpus; src++)
		for (u32 dst = 0; dst < ncpus; dst++)
			late[src][dst] = !pair_landed(&(struct pair){ src, dst });
	bool landed = wait_until(all_ipis_landed, NULL, WAIT_MS);
	u64 landed_us = (rdtsc() - t_done) * 1000 / tsc_khz();
	if (!landed)
		request_dump();
	/* Close the host's window (stop, then read busy: see the header); IF=1, so its last pulse is taken. */
	atomic_xchg(&host_link.stop, 1);
	bool host_quiet = wait_eq(&host_link.busy, 0, WAIT_MS);
	if (!landed)
		report_after_dump();
	printf("STORM: end\n");
	ioapic_set_entry(10, IOAPIC_MASKED);
	ioapic_set_entry(11, IOAPIC_MASKED);

	u32 s = 0, r = 0, stuck_cpus = 0;
	for (u32 c = 0; c < ncpus; c++) {
		printf("COUNT: cpu %u sent=%u received=%u\n", c, sent[c], received_by(c));
		s += sent[c];
		r += received_by(c);
		stuck_cpus += stuck[c];
	}
	print_pairs("COUNT:");
	for (u32 src = 0; src < ncpus; src++)
		for (u32 dst = 0; dst < ncpus; dst++)
			if (late[src][dst])
				printf("COUNT: late ipi %u->%u\n", src, dst);
	printf("COUNT: ipi_sent=%u ipi_received=%u dev=%u dev10=%u dev11=%u landed_us=%u\n", s, r, dev_count,
	       host_link.dev10, dev11, (u32)landed_us);
	check(all && stuck_cpus == 0, "every cpu finished its storm", "%u finished, %u stuck", finished,
	      stuck_cpus);
	check(s == ncpus * IPIS_PER_CPU, "every ipi was sent", "sent %u of %u", s, ncpus * IPIS_PER_CPU);
	check(s == r && landed, "ipis sent == received", "sent %u received %u", s, r);
	check(pulses == DEV_PULSES && dev11 == DEV_PULSES, "device pulses delivered exactly once during the storm",
	      "%u of %u pulses arrived, %u interrupts on line 11", pulses, DEV_PULSES, dev11);
	check(host_quiet, "host line 10 quiet at the end", "the host's last pulse was never counted");
}
