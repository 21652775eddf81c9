/* lp_tpr_race: lowest-priority IPIs while their targets change TPR (issue 10). The APs rewrite their TPR
 * (alternately 0 and 20H, with IF=0) as fast as they can while the BSP sends lowest-priority IPIs to all other
 * CPUs. SDM vol. 3 11.6.2.4: each such IPI is accepted by exactly one of them, the one with the lowest
 * processor priority at arbitration (even a single target is arbitrated). irqvm's `user` mode once read the
 * targets' priorities twice during one arbitration, and when they changed in between it divided by zero on the
 * sending vCPU's thread: the VMM died with the guest. After the storm each AP lowers its TPR and takes what
 * it was sent (one pending vector at most: IRR holds one bit per vector). With one CPU there is no target. */
#include "guest.h"

#define V_LP 0x40
#define SENDS 20000u

static volatile u32 stop, flipping[MAX_CPUS];
static volatile u64 flips[MAX_CPUS];

static void flip_tpr(void *arg)
{
	(void)arg;
	u32 cpu = this_cpu();
	u32 tpr = 0;
	cli();
	WRITE_ONCE(flipping[cpu], 1);
	while (!READ_ONCE(stop)) {
		tpr ^= 0x20;
		apic_write(APIC_TPR, tpr);
		flips[cpu]++;
	}
	apic_write(APIC_TPR, 0); /* the idle loop's sti then takes the pending vector */
}

void guest_main(void)
{
	platform_init(false);
	u32 online = smp_start_all();
	check(online == ncpus, "all cpus online", "%u of %u", online, ncpus);
	if (ncpus < 2) {
		skip("lowest priority ipis while targets change tpr", "one cpu");
		return;
	}
	irq_reset_counts();
	for (u32 c = 1; c < ncpus; c++) {
		smp_call_async(c, flip_tpr, NULL);
		wait_nonzero(&flipping[c], WAIT_MS);
	}
	u32 sent = 0;
	for (; sent < SENDS; sent++)
		if (!apic_icr_write(0, APIC_SH_OTHERS | APIC_DM_LOWEST | V_LP))
			break;
	WRITE_ONCE(stop, 1);
	u64 total_flips = 0;
	for (u32 c = 1; c < ncpus; c++)
		total_flips += READ_ONCE(flips[c]);
	printf("INFO: %u lowest-priority IPIs sent while the APs made %lu TPR writes\n", sent, total_flips);
	check(sent == SENDS, "lowest priority ipis while targets change tpr", "%u of %u sent", sent, SENDS);
	/* The APs leave the loop and take what is pending: at least one of them was sent the vector. */
	u32 taken = 0;
	for (u64 ms = 0; ms < WAIT_MS && !(taken = irq_count_total(V_LP)); ms++)
		delay_ms(1);
	check(taken >= 1 && taken < ncpus, "the aps took the lowest priority vector", "taken %u times", taken);
}
