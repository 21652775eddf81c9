/* demo: what `irqvm` runs with no arguments. Brings up every CPU, prints "CPU n online (APIC ID x)", then
 * passes a token around the ring of CPUs with fixed IPIs ("CPU 0 -> CPU 1", ..., back to CPU 0), and exits 0
 * if the token came home. */
#include "guest.h"

#define V_TOKEN 0x80
#define LAPS 2

static volatile u32 hops;
static void token_handler(struct irq_frame *f, u32 cpu)
{
	apic_eoi();
	u32 next = (cpu + 1) % ncpus;
	u32 h = atomic_fetch_add(&hops, 1) + 1;
	if (h < LAPS * ncpus) {
		printf("CPU %u -> CPU %u\n", cpu, next);
		apic_send_fixed(cpu_to_apic_id(next), V_TOKEN);
	}
}

void guest_main(void)
{
	platform_init(false);
	printf("irqvm demo: %u CPU(s)\n", ncpus);
	printf("CPU 0 online (APIC ID %u)\n", cpu_apic_id[0]);
	for (u32 c = 1; c < ncpus; c++) {
		if (smp_start_ap(c))
			printf("CPU %u online (APIC ID %u)\n", c, cpu_apic_id[c]);
		else
			fail("cpu online", "CPU %u did not start", c);
	}
	irq_set_handler(V_TOKEN, token_handler);
	printf("CPU 0 -> CPU %u\n", 1 % ncpus);
	apic_send_fixed(cpu_to_apic_id(1 % ncpus), V_TOKEN);
	bool ok = wait_ge(&hops, LAPS * ncpus, WAIT_MS * 2);
	check(ok, "ipi ring", "token stopped after %u of %u hops", hops, LAPS * ncpus);
	if (ok)
		printf("token went %u times around %u CPU(s)\n", LAPS, ncpus);
}
