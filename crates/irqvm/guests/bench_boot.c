/* bench_boot: AP bring-up time, from the BSP's first INIT to every AP online (see bench.h for the output), on up to
 * 1024 CPUs (a BIG_GUEST of the Makefile: built against the MAX_CPUS=1024 library; the CPUs come from the MADT).
 * Each AP gets INIT, then SIPI at once, and a second SIPI only if it is not online 1 ms later: the fast form of
 * the SDM's INIT-SIPI-SIPI sequence (vol. 3, "MP initialization"), without the 10 ms wait after INIT that real
 * hardware needs but KVM and QEMU do not. The local APICs run in x2APIC mode wherever CPUID offers it (one WRMSR per
 * IPI, and the only way to address APIC IDs past 254, SDM vol. 3 §11.12); `x2apic=0` on the command line keeps
 * xAPIC mode. An AP that was never started is in xAPIC mode when its INIT arrives: the INIT and SIPI reach it by
 * its initial x2APIC ID (KVM's rule for 32-bit IDs, irqchip::bus), and its start-up code switches it to x2APIC.
 *
 * Workload `boot`: one sample per AP, cycles from the first INIT until that AP was online. On 1 CPU there is
 * nothing to start and the workload reports no samples. Four more workloads split each AP's start-up into
 * phases (guest TSC, one sample per AP; the TSC is the host's on every vCPU under KVM and TCG):
 *   boot_send    the BSP's loop to the AP and its INIT: from the end of the previous AP's figures to the INIT
 *                ICR write's return
 *   boot_wake    from there to the AP's first trampoline instruction: the SIPI's ICR write, the AP's INIT and
 *                SIPI (its wake-up, the VMM's register writes), its entry into the guest
 *   boot_ap      the AP's own start-up: trampoline (real → protected → long mode), C entry, local APIC set-up
 *   boot_notice  from the AP marking itself online to the BSP seeing it
 * The four add up to the AP's share of `boot`. */
#define BENCH_MAX 1024
#include "bench.h"

extern char trampoline_start[], trampoline_end[];
extern volatile u64 ap_boot_stack;
extern volatile u32 ap_boot_cpu;
extern volatile u64 tramp_tsc; /* entry.S: the TSC at the trampoline's first instruction, in its copy */
extern u8 cpu_stacks[MAX_CPUS][STACK_SIZE];

#define N_PHASES 4
static const char *const phase_names[N_PHASES] = { "boot_send", "boot_wake", "boot_ap", "boot_notice" };
static u64 phase[N_PHASES][MAX_CPUS];
static volatile u64 online_tsc[MAX_CPUS];

/* Where the AP's copy of the trampoline keeps its first TSC. */
static volatile u64 *tramp_tsc_copy(void)
{
	return (volatile u64 *)(TRAMPOLINE_ADDR + ((usize)&tramp_tsc - (usize)trampoline_start));
}

/* Runs on the AP after its local APIC set-up, right before it marks itself online. */
static void arrived(u32 cpu)
{
	online_tsc[cpu] = rdtsc();
}

static u64 since(u64 from, u64 to)
{
	return to > from ? to - from : 0;
}

static bool start_ap_fast(u32 cpu, u64 *inited)
{
	WRITE_ONCE(cpu_online[cpu], 0);
	ap_boot_cpu = cpu;
	ap_boot_stack = (u64)&cpu_stacks[cpu][STACK_SIZE];
	*tramp_tsc_copy() = 0;
	barrier();
	u32 id = cpu_to_apic_id(cpu);
	apic_icr_write(id, APIC_DM_INIT | APIC_LEVEL_ASSERT);
	*inited = rdtsc();
	apic_icr_write(id, APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12));
	if (wait_nonzero(&cpu_online[cpu], 1))
		return true;
	apic_icr_write(id, APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12));
	return wait_nonzero(&cpu_online[cpu], WAIT_MS);
}

void guest_main(void)
{
	bool x2 = cmdline_u64("x2apic", 1) && cpu_has_x2apic();
	platform_init(x2);
	printf("INFO: %u CPUs (MADT %u, fw_cfg %u), %s\n", ncpus, madt_cpus, fwcfg_cpus, apic_x2 ? "x2APIC" : "xAPIC");
	memcpy((void *)TRAMPOLINE_ADDR, trampoline_start, trampoline_end - trampoline_start);
	ap_arrival_hook = arrived;
	u32 online = 1;
	bench_begin("boot");
	u64 t0 = rdtsc(), start = t0;
	for (u32 c = 1; c < ncpus; c++) {
		u64 inited = 0;
		bool ok = start_ap_fast(c, &inited);
		u64 seen = rdtsc(), entry = *tramp_tsc_copy();
		online += ok;
		record(seen - t0);
		phase[0][c] = since(start, inited);
		phase[1][c] = entry ? since(inited, entry) : 0;
		phase[2][c] = entry ? since(entry, online_tsc[c]) : 0;
		start = rdtsc();
		phase[3][c] = since(online_tsc[c], start);
	}
	bench_end("boot");
	/* `sent` is the APs started, `counted` those that came online; a start is an INIT and one or two SIPIs. */
	bench_report("boot", ncpus - 1, online - 1, 2 * (ncpus - 1), 0);
	for (u32 p = 0; p < N_PHASES; p++) {
		nsamples = 0;
		for (u32 c = 1; c < ncpus; c++)
			record(phase[p][c]);
		bench_report(phase_names[p], ncpus - 1, online - 1, 0, 0);
	}
}
