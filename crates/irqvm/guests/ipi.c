/* ipi: inter-processor interrupts in xAPIC mode: fixed ping-pong, self IPI, broadcasts, logical flat and
 * logical cluster destinations (LDR/DFR, several LDR bits per CPU, flat and cluster APICs side by side),
 * lowest priority arbitration by TPR, a physical destination two APICs share (a written xAPIC ID), NMI IPI. */
#include "ipi_core.h"

#define V_MULTI 0x48
#define V_MIXED 0x4A
#define V_ALIAS 0x4B

struct logical_setup { u32 dfr, ldr[MAX_CPUS]; };
static void set_logical(void *arg)
{
	struct logical_setup *s = arg;
	apic_write(APIC_DFR, s->dfr);
	apic_write(APIC_LDR, s->ldr[this_cpu()]);
}
static bool program_logical(struct logical_setup *s)
{
	bool ok = true;
	for (u32 c = 1; c < ncpus; c++)
		ok &= smp_call(c, set_logical, s);
	set_logical(s);
	return ok;
}

/* Flat model with two LDR bits per CPU: bit c and bit c + 4 (up to 4 CPUs). A destination is matched by any
 * common bit (SDM vol. 3 §11.6.2.2), and an APIC that matches through both bits still takes the message once. */
static void logical_flat_two_bits(struct logical_setup *s, u32 all)
{
	if (ncpus > 4) {
		skip("logical flat, two ldr bits per cpu", "%u CPUs: 8 LDR bits hold 4", ncpus);
		return;
	}
	s->dfr = 0xFFFFFFFF;
	for (u32 c = 0; c < ncpus; c++)
		s->ldr[c] = ((1u << c) | (1u << (c + 4))) << 24;
	check(program_logical(s), "logical flat, two ldr bits per cpu, setup", "an smp_call timed out");
	u32 last = ncpus - 1;
	logical_ipi("logical flat, two ldr bits per cpu, the high bit alone", 1u << (last + 4), 1u << last, V_MULTI);
	logical_ipi("logical flat, two ldr bits per cpu, both bits of cpu 0, taken once", 0x11, 1, V_MULTI);
	logical_ipi("logical flat, two ldr bits per cpu, every high bit", 0xF0, all, V_MULTI);
}

/* The SDM wants one model on every APIC (§11.6.2.2); where they differ, KVM (kvm_apic_match_logical_addr) and
 * irqvm match each APIC by its own DFR. CPU 0 goes flat with LDR bit 0, the others stay in the cluster layout
 * below (CPU c: cluster c & 1, member bit 1 << (c >> 1)). Destination 0x11 is cluster 1 member bit 0 for the
 * cluster APICs (CPU 1) and holds bit 0 for the flat one (CPU 0); 0x02 is cluster 0 member bit 1 (CPU 2) and
 * misses CPU 0's flat bit. */
static void logical_mixed_models(struct logical_setup *s)
{
	if (ncpus < 2) {
		skip("logical, flat and cluster apics side by side", "only %u CPU", ncpus);
		return;
	}
	s->dfr = 0xFFFFFFFF;
	s->ldr[0] = 1u << 24;
	set_logical(s);
	logical_ipi("logical, flat and cluster apics side by side, dest 0x11", 0x11, 0x3, V_MIXED);
	logical_ipi("logical, flat and cluster apics side by side, dest 0x02", 0x02, ncpus > 2 ? 0x4 : 0, V_MIXED);
}

/* xAPIC IDs are writable (SDM vol. 3 §11.4.6), so two APICs can hold the same one; a physical destination then
 * reaches both (§11.6.2.1: each APIC compares it with its own ID; KVM does so too unless the VMM enabled 32-bit
 * x2APIC IDs, which irqvm does only for APIC IDs past 254). The last CPU takes CPU 0's ID, waits with IF set
 * until the BSP is done, and takes its own back. */
static volatile u32 alias_held, alias_done, alias_read;
static void hold_alias_id(void *arg)
{
	u32 own = apic_read(APIC_ID);
	apic_write(APIC_ID, (u32)(usize)arg << 24);
	alias_read = apic_read(APIC_ID) >> 24;
	WRITE_ONCE(alias_held, 1);
	wait_eq(&alias_done, 1, WAIT_MS * 4);
	apic_write(APIC_ID, own);
	WRITE_ONCE(alias_held, 0);
}

/* Sends fixed `vector` to physical destination `dest`; true if exactly the CPUs in `expect` took it. */
static bool physical_ipi(u32 dest, u32 expect, u32 vector, char *why, usize n)
{
	u32 before[MAX_CPUS];
	irq_count_snapshot(vector, before);
	apic_icr_write(dest, vector);
	return expect_delivery(vector, before, expect, why, n);
}

static void aliased_physical_id(void)
{
	if (ncpus < 2) {
		skip("physical ipi to an xapic id two apics hold", "only %u CPU", ncpus);
		return;
	}
	char why[96];
	u32 last = ncpus - 1, own = cpu_to_apic_id(last), shared = cpu_to_apic_id(0);
	alias_done = 0;
	bool held = smp_call_async(last, hold_alias_id, (void *)(usize)shared) && wait_eq(&alias_held, 1, WAIT_MS);
	check(held && alias_read == shared, "xapic id written on the last cpu reads back", "held %u, id %x", held,
	      alias_read);
	check(physical_ipi(shared, 1u | 1u << last, V_ALIAS, why, sizeof why),
	      "physical ipi to an xapic id two apics hold reaches both", "%s", why);
	check(physical_ipi(own, 0, V_ALIAS, why, sizeof why), "physical ipi to the id given up reaches nobody", "%s",
	      why);
	WRITE_ONCE(alias_done, 1);
	bool back = smp_wait(last, WAIT_MS);
	check(back && physical_ipi(own, 1u << last, V_ALIAS, why, sizeof why),
	      "physical ipi to the id taken back reaches its cpu alone", "returned %u: %s", back, why);
}

void guest_main(void)
{
	platform_init(false);
	if (!start_cpus())
		return;
	core_ipi_checks();
	u32 all = (1u << ncpus) - 1;
	struct logical_setup s;

	/* Flat model (DFR 0xFFFFFFFF): LDR[31:24] is a bit mask, one bit per CPU. */
	s.dfr = 0xFFFFFFFF;
	for (u32 c = 0; c < ncpus; c++)
		s.ldr[c] = (1u << c) << 24;
	check(program_logical(&s), "logical flat setup", "an smp_call timed out");
	check(apic_read(APIC_DFR) == 0xFFFFFFFF && apic_read(APIC_LDR) == 1u << 24, "ldr/dfr read back",
	      "DFR %x LDR %x", apic_read(APIC_DFR), apic_read(APIC_LDR));
	u32 odd = all & 0xAA; /* CPUs 1 and 3 */
	if (ncpus >= 2)
		logical_ipi("logical flat to odd cpus", odd, odd, V_LOGICAL);
	logical_ipi("logical flat to all cpus", all, all, V_LOGICAL);
	logical_ipi("logical flat to nobody", 0, 0, V_LOGICAL);
	lowest_priority(all);

	/* Cluster model (DFR 0x0FFFFFFF): LDR[31:28] cluster, LDR[27:24] member bits. CPU c is in cluster c & 1
	 * with member bit 1 << (c >> 1), so cluster 1 holds the odd CPUs. */
	s.dfr = 0x0FFFFFFF;
	for (u32 c = 0; c < ncpus; c++)
		s.ldr[c] = ((c & 1) << 28) | ((1u << (c >> 1)) << 24);
	check(program_logical(&s), "logical cluster setup", "an smp_call timed out");
	logical_ipi("logical cluster 1 (odd cpus)", 0x10 | 0x3, odd, V_CLUSTER);
	logical_ipi("logical cluster 0 member 0 (cpu 0)", 0x01, 1, V_CLUSTER);
	logical_ipi("logical cluster broadcast dest 0xff [tcg-apic-gap]", 0xFF, all, V_CLUSTER);
	logical_mixed_models(&s);

	logical_flat_two_bits(&s, all);
	aliased_physical_id();
	nmi_ipi();
	remote_read_ipi();
}
