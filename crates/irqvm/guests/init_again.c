/* init_again: an AP that has parked itself in a `cli; hlt` loop is sent INIT and then SIPI again, and must run
 * the trampoline a second time (SDM vol. 3: INIT puts the processor in wait-for-SIPI whatever it was doing, even
 * with IF=0). A SIPI to an AP that is running (not waiting for SIPI) must be ignored. INIT to the BSP as such is
 * not tested: it would restart the guest at the reset vector. But whether INIT restarts a CPU or parks it in
 * wait-for-SIPI follows its IA32_APIC_BASE.BSP flag as it is at the INIT, which software may write (SDM vol. 4
 * table 2-2, "BSP flag (R/W)"; KVM's `kvm_vcpu_is_bsp` reads the flag): the last part clears CPU 0's flag, has
 * the AP send CPU 0 INIT and SIPI, and CPU 0 must come up through the trampoline like an AP; the AP then ends the
 * run. */
#include "guest.h"

static volatile u32 ran_on[MAX_CPUS];
static void mark(void *arg) { atomic_inc(&ran_on[this_cpu()]); }

static volatile u64 base_seen;
static void read_apic_base(void *arg) { base_seen = rdmsr(APIC_BASE_MSR); }

/* Runs on the AP while CPU 0, its BSP flag cleared, is parked in cli;hlt; ends the run. */
static void restart_cpu0_as_an_ap(void *arg)
{
	const u32 bsp = 0;
	while (!READ_ONCE(cpu_parked[bsp]))
		cpu_relax();
	smp_send_init(bsp);
	delay_ms(20);
	check(cpu_boot_count[bsp] == 1 && !cpu_online[bsp], "init to cpu 0 with its bsp flag clear waits for sipi",
	      "boot count %u online %u", cpu_boot_count[bsp], cpu_online[bsp]);
	smp_send_sipis(bsp);
	bool up = wait_nonzero(&cpu_online[bsp], WAIT_MS);
	check(up && cpu_boot_count[bsp] == 2, "sipi starts cpu 0 through the trampoline", "online %u boot count %u",
	      up, cpu_boot_count[bsp]);
	bool called = up && smp_call(bsp, read_apic_base, NULL);
	check(called && !(base_seen & APIC_BASE_BSP) && (base_seen & APIC_BASE_EN),
	      "cpu 0 keeps its cleared bsp flag across init", "call %u, IA32_APIC_BASE %lx", called, base_seen);
	done();
}

/* The last part: CPU 0 hands the run to the AP and never returns. */
static void init_cpu0_without_its_bsp_flag(u32 ap)
{
	wrmsr(APIC_BASE_MSR, rdmsr(APIC_BASE_MSR) & ~(u64)APIC_BASE_BSP);
	if (!check(smp_call_async(ap, restart_cpu0_as_an_ap, NULL), "ap takes over the run", "kick failed"))
		return;
	smp_park_cli_hlt(NULL);
}

void guest_main(void)
{
	platform_init(false);
	if (ncpus < 2) {
		skip("init again", "only %u CPU", ncpus);
		return;
	}
	const u32 ap = 1, id = cpu_to_apic_id(ap);
	if (!check(smp_start_ap(ap), "ap first start", "AP %u did not come online", ap))
		return;
	check(cpu_boot_count[ap] == 1, "trampoline ran once", "ran %u times", cpu_boot_count[ap]);
	check(smp_call(ap, mark, NULL) && ran_on[ap] == 1, "ap runs calls", "call did not run (%u)", ran_on[ap]);

	/* A SIPI without INIT while the AP is up (idle in sti;hlt) is ignored. */
	apic_icr_write(id, APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12));
	delay_ms(50);
	check(cpu_boot_count[ap] == 1, "sipi to a running ap ignored", "trampoline ran %u times", cpu_boot_count[ap]);

	/* Park the AP with interrupts off. */
	check(smp_call_async(ap, smp_park_cli_hlt, NULL), "park request sent", "kick failed");
	if (!check(wait_nonzero(&cpu_parked[ap], WAIT_MS), "ap parked in cli;hlt", "AP did not park"))
		return;

	/* INIT alone: the AP goes to wait-for-SIPI; it must not run the trampoline yet. */
	WRITE_ONCE(cpu_online[ap], 0);
	apic_icr_write(id, APIC_DM_INIT | APIC_LEVEL_ASSERT);
	delay_ms(20);
	check(cpu_boot_count[ap] == 1 && !cpu_online[ap], "init alone does not restart", "boot count %u online %u",
	      cpu_boot_count[ap], cpu_online[ap]);

	apic_icr_write(id, APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12));
	bool up = wait_nonzero(&cpu_online[ap], WAIT_MS);
	check(up && cpu_boot_count[ap] == 2, "sipi after init reruns trampoline", "online %u boot count %u", up,
	      cpu_boot_count[ap]);
	check(cpu_apic_id[ap] == id, "ap apic id after restart", "read %u, expected %u", cpu_apic_id[ap], id);
	check(smp_call(ap, mark, NULL) && ran_on[ap] == 2, "ap runs calls after restart", "call did not run (%u)",
	      ran_on[ap]);

	/* Once more, through the library's full INIT-SIPI-SIPI sequence, from the idle (sti;hlt) state. */
	check(smp_start_ap(ap) && cpu_boot_count[ap] == 3, "init-sipi-sipi from idle", "boot count %u",
	      cpu_boot_count[ap]);
	check(smp_call(ap, mark, NULL) && ran_on[ap] == 3, "ap runs calls after third start", "call did not run (%u)",
	      ran_on[ap]);
	init_cpu0_without_its_bsp_flag(ap);
}
