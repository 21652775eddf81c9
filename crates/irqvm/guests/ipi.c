/* ipi: inter-processor interrupts in xAPIC mode: fixed ping-pong, self IPI, broadcasts, logical flat and
 * logical cluster destinations (LDR/DFR), lowest priority arbitration by TPR, NMI IPI. */
#include "ipi_core.h"

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

	nmi_ipi();
}
