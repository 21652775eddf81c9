/* bench_boot: AP bring-up time, from the BSP's first INIT to every AP online (see bench.h for the output).
 * Each AP gets INIT, then SIPI at once, and a second SIPI only if it is not online 1 ms later: the fast form of
 * the SDM's INIT-SIPI-SIPI sequence (vol. 3, "MP initialization"), without the 10 ms wait after INIT that real
 * hardware needs but KVM and QEMU do not. One sample per AP: cycles from the first INIT until that AP was online.
 * On 1 CPU there is nothing to start and the workload reports no samples. */
#include "bench.h"

extern char trampoline_start[], trampoline_end[];
extern volatile u64 ap_boot_stack;
extern volatile u32 ap_boot_cpu;
extern u8 cpu_stacks[MAX_CPUS][STACK_SIZE];

static bool start_ap_fast(u32 cpu)
{
	WRITE_ONCE(cpu_online[cpu], 0);
	ap_boot_cpu = cpu;
	ap_boot_stack = (u64)&cpu_stacks[cpu][STACK_SIZE];
	barrier();
	u32 id = cpu_to_apic_id(cpu);
	apic_icr_write(id, APIC_DM_INIT | APIC_LEVEL_ASSERT);
	apic_icr_write(id, APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12));
	if (wait_nonzero(&cpu_online[cpu], 1))
		return true;
	apic_icr_write(id, APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12));
	return wait_nonzero(&cpu_online[cpu], WAIT_MS);
}

void guest_main(void)
{
	platform_init(false);
	memcpy((void *)TRAMPOLINE_ADDR, trampoline_start, trampoline_end - trampoline_start);
	u32 online = 1;
	bench_begin("boot");
	u64 t0 = rdtsc();
	for (u32 c = 1; c < ncpus; c++) {
		online += start_ap_fast(c);
		record(rdtsc() - t0);
	}
	bench_end("boot");
	/* `sent` is the APs started, `counted` those that came online; a start is an INIT and one or two SIPIs. */
	bench_report("boot", ncpus - 1, online - 1, 2 * (ncpus - 1), 0);
}
