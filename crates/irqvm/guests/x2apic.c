/* x2apic: the core IPI checks in x2APIC mode (IA32_APIC_BASE.EXTD, MSR access 0x800+), plus the x2APIC
 * specifics: 32-bit APIC ID, read-only LDR derived from the ID, SELF_IPI MSR, logical cluster destinations. */
#include "ipi_core.h"

static volatile u32 ldr_of[MAX_CPUS], base_of[MAX_CPUS];
static void record(u32 cpu)
{
	ldr_of[cpu] = apic_read(APIC_LDR);
	base_of[cpu] = (u32)rdmsr(APIC_BASE_MSR);
}

/* #GP from a WRMSR: count it and step over the 2-byte instruction. */
static volatile u32 gp_count;
static void gp_handler(struct irq_frame *f, u32 cpu)
{
	gp_count++;
	f->rip += 2;
}
/* SDM 11.12.1.2: the DFR has no x2APIC MSR (0x80E is reserved): access faults. ICR2 (0x831) does not exist. */
static void reserved_msrs(void)
{
	irq_set_handler(13, gp_handler);
	gp_count = 0;
	__asm__ volatile("wrmsr" : : "c"(0x80E), "a"(0xFFFFFFFFu), "d"(0) : "memory");
	check(gp_count == 1, "x2apic dfr msr write faults", "%u #GP", gp_count);
	gp_count = 0;
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0x831) : "memory");
	check(gp_count == 1, "x2apic icr2 msr read faults", "%u #GP", gp_count);
	irq_set_handler(13, NULL);
}

/* An I/O APIC entry in logical mode reaches x2APIC-mode CPUs through its 8-bit destination taken as an x2APIC
 * logical ID: cluster 0, member bit n for the CPU whose x2APIC ID is n (SDM vol. 3 11.12.10.2; KVM passes a
 * device's 8-bit destination on unchanged, 0xFF excepted, the broadcast). Every CPU but CPU 1 is named, as
 * kvm-unit-tests' ioapic test does with 0x0D on 4 CPUs. Edge-triggered; pc-testdev drives the line. */
#define V_IOAPIC_LOGICAL 0x5A
#define IOAPIC_LOGICAL_LINE 10
static void ioapic_logical(void)
{
	u32 dest = 0, expect = 0, before[MAX_CPUS];
	char why[96];
	for (u32 c = 0; c < ncpus; c++) {
		if (c == 1 && ncpus >= 2)
			continue;
		if (cpu_to_apic_id(c) >= 8) {
			skip("ioapic logical destination reaches the x2apic cluster 0 members it names",
			     "cpu %u has x2APIC ID %u, past the 8-bit destination", c, cpu_to_apic_id(c));
			return;
		}
		dest |= 1u << cpu_to_apic_id(c);
		expect |= 1u << c;
	}
	irq_count_snapshot(V_IOAPIC_LOGICAL, before);
	ioapic_set_entry(IOAPIC_LOGICAL_LINE, (u64)dest << 56 | IOAPIC_LOGICAL | V_IOAPIC_LOGICAL);
	testdev_set_irq(IOAPIC_LOGICAL_LINE, 1);
	bool ok = expect_delivery(V_IOAPIC_LOGICAL, before, expect, why, sizeof why);
	testdev_set_irq(IOAPIC_LOGICAL_LINE, 0);
	ioapic_set_entry(IOAPIC_LOGICAL_LINE, IOAPIC_MASKED);
	check(ok, "ioapic logical destination reaches the x2apic cluster 0 members it names", "dest %x: %s", dest,
	      why);
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
	reserved_msrs();
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
	ioapic_logical();
	lowest_priority(all);
	nmi_ipi();
	remote_read_ipi();
}
