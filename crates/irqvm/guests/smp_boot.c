/* smp_boot: brings up every AP with INIT-SIPI-SIPI (SDM vol. 3, MP initialization). Each AP reports the APIC ID
 * it reads from its own local APIC and whether IA32_APIC_BASE.BSP is clear, and increments a shared counter. */
#include "guest.h"

static volatile u32 arrived;
static volatile u32 ap_base_msr[MAX_CPUS];

static void on_arrival(u32 cpu)
{
	ap_base_msr[cpu] = (u32)rdmsr(APIC_BASE_MSR);
	atomic_inc(&arrived);
}

void guest_main(void)
{
	char name[64];
	platform_init(false);
	u32 base = (u32)rdmsr(APIC_BASE_MSR);
	check(base & APIC_BASE_BSP, "bsp flag set on cpu 0", "IA32_APIC_BASE = %x", base);
	check((base & 0xFFFFF000) == 0xFEE00000, "apic base address", "IA32_APIC_BASE = %x", base);
	check(cpu_apic_id[0] == 0, "bsp apic id 0", "APIC ID %u", cpu_apic_id[0]);
	printf("CPU 0: APIC ID %u (BSP), %u CPU(s) from fw_cfg\n", cpu_apic_id[0], ncpus);
	if (ncpus < 2) {
		skip("ap bring-up", "only %u CPU", ncpus);
		return;
	}
	ap_arrival_hook = on_arrival;
	for (u32 c = 1; c < ncpus; c++) {
		bool ok = smp_start_ap(c);
		if (!check(ok, sfmt(name, sizeof name, "cpu %u online", c), "no sign of life after INIT-SIPI-SIPI"))
			continue;
		printf("CPU %u: APIC ID %u\n", c, cpu_apic_id[c]);
		check(cpu_apic_id[c] == cpu_to_apic_id(c), sfmt(name, sizeof name, "cpu %u apic id", c),
		      "expected %u, AP read %u", cpu_to_apic_id(c), cpu_apic_id[c]);
		check(!(ap_base_msr[c] & APIC_BASE_BSP) && (ap_base_msr[c] & APIC_BASE_EN),
		      sfmt(name, sizeof name, "cpu %u apic base (BSP clear, enabled)", c), "IA32_APIC_BASE = %x",
		      ap_base_msr[c]);
		check(cpu_boot_count[c] == 1, sfmt(name, sizeof name, "cpu %u ran the trampoline once", c),
		      "ran it %u times", cpu_boot_count[c]);
	}
	check(arrived == ncpus - 1, "all cpus online", "%u of %u APs arrived", arrived, ncpus - 1);
}
