/* x2apic: the core IPI checks in x2APIC mode (IA32_APIC_BASE.EXTD, MSR access 0x800+), plus the x2APIC
 * specifics: 32-bit APIC ID, read-only LDR derived from the ID, SELF_IPI MSR, logical cluster destinations. */
#include "ipi_core.h"

static volatile u32 ldr_of[MAX_CPUS], base_of[MAX_CPUS];
static void record(u32 cpu)
{
	ldr_of[cpu] = apic_read(APIC_LDR);
	base_of[cpu] = (u32)rdmsr(APIC_BASE_MSR);
}

void guest_main(void)
{
	if (!cpu_has_x2apic()) {
		skip("x2apic", "CPUID.1:ECX[21] is clear");
		return;
	}
	apic_use_x2apic(true);
	platform_init(true);
	ap_arrival_hook = record;
	record(0);
	check((base_of[0] & (APIC_BASE_EXTD | APIC_BASE_EN)) == (APIC_BASE_EXTD | APIC_BASE_EN), "extd enabled",
	      "IA32_APIC_BASE %x", base_of[0]);
	check(rdmsr(0x802) == 0, "x2apic id msr on cpu 0", "APIC ID %lx", rdmsr(0x802));
	if (!start_cpus())
		return;
	bool ok = true;
	for (u32 c = 0; c < ncpus; c++) {
		u32 id = cpu_to_apic_id(c), want = ((id >> 4) << 16) | (1u << (id & 15));
		if (ldr_of[c] != want || cpu_apic_id[c] != id || !(base_of[c] & APIC_BASE_EXTD)) {
			fail("x2apic ldr and id per cpu", "cpu %u: LDR %x (want %x) ID %u base %x", c, ldr_of[c], want,
			     cpu_apic_id[c], base_of[c]);
			ok = false;
		}
	}
	if (ok)
		pass("x2apic ldr and id per cpu");
	core_ipi_checks();
	u32 all = (1u << ncpus) - 1, odd = all & 0xAA;
	if (ncpus >= 2)
		logical_ipi("x2apic logical cluster 0, odd cpus", odd, odd, V_LOGICAL);
	logical_ipi("x2apic logical cluster 0, all cpus", all, all, V_LOGICAL);
	logical_ipi("x2apic logical cluster 1 (nobody)", (1u << 16) | 0xFFFF, 0, V_CLUSTER);
	lowest_priority(all);
	nmi_ipi();
}
