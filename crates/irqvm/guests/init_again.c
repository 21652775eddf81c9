/* init_again: an AP that has parked itself in a `cli; hlt` loop is sent INIT and then SIPI again, and must run
 * the trampoline a second time (SDM vol. 3: INIT puts the processor in wait-for-SIPI whatever it was doing, even
 * with IF=0). A SIPI to an AP that is running (not waiting for SIPI) must be ignored. INIT to the BSP is not
 * tested: it would restart the guest. */
#include "guest.h"

static volatile u32 ran_on[MAX_CPUS];
static void mark(void *arg) { atomic_inc(&ran_on[this_cpu()]); }

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
}
