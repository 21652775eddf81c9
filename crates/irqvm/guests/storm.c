/* storm: every CPU sends IPIS_PER_CPU fixed IPIs round-robin to the other CPUs while device lines fire.
 * The vector carries the sender (V_STORM + sender), and a sender waits until its previous IPI to a destination
 * arrived before sending the next one there, so no two IPIs can merge in one IRR bit: every IPI sent must be
 * received exactly once. Device interrupts: IOAPIC pins 10 and 11 (edge, ISA lines of pc-testdev) go to CPU 0
 * and to the last CPU; the guest pulses line 11 itself DEV_PULSES times, and a VMM test may raise lines 10 and
 * 11 from the host as well. Totals are printed as
 *   COUNT: ipi_sent=S ipi_received=R dev=D
 * PASS if S == R (and the guest's own pulses all arrived). */
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
static volatile u32 dev_count, stuck[MAX_CPUS], finished;
static volatile u32 go;

static void storm_handler(struct irq_frame *f, u32 cpu)
{
	u32 src = (u32)f->vector - V_STORM;
	if (src < MAX_CPUS)
		recv_from[cpu][src]++;
	received[cpu]++;
	apic_eoi();
}
static void dev_handler(struct irq_frame *f, u32 cpu)
{
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
	irq_set_handler(V_DEV10, dev_handler);
	irq_set_handler(V_DEV11, dev_handler);
	ioapic_set_entry(10, (u64)cpu_to_apic_id(0) << 56 | V_DEV10);
	ioapic_set_entry(11, (u64)cpu_to_apic_id(ncpus - 1) << 56 | V_DEV11);
	printf("STORM: start\n"); /* a VMM test may start raising lines 10/11 here */

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
	delay_ms(20); /* the last IPIs land */
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
	printf("COUNT: ipi_sent=%u ipi_received=%u dev=%u\n", s, r, dev_count);
	check(all && stuck_cpus == 0, "every cpu finished its storm", "%u finished, %u stuck", finished,
	      stuck_cpus);
	check(s == ncpus * IPIS_PER_CPU, "every ipi was sent", "sent %u of %u", s, ncpus * IPIS_PER_CPU);
	check(s == r, "ipis sent == received", "sent %u received %u", s, r);
	check(pulses == DEV_PULSES && dev_count >= DEV_PULSES, "device pulses delivered during the storm",
	      "%u of %u pulses arrived, dev=%u", pulses, DEV_PULSES, dev_count);
}
