/* bench_irqhost: device interrupts raised by a host thread (irqvm only: QEMU has no such thread). IOAPIC pin 11
 * (edge) goes to CPU 0, whose handler counts and time-stamps; pin 12 only wakes it. The guest prints where its
 * counter and its stop flag are, then halts with interrupts enabled until the host sets the stop flag:
 *   READY: count=<addr> stop=<addr> apic=<CPU 0's APIC ID>
 * The host reads the counter from guest memory (identity-mapped: the address is guest-physical), pulses line 11
 * at the rates it measures, then sends V_HOST to CPU 0 as MSIs (fixed, physical, edge) the same way, then sets
 * the stop flag and pulses line 12. The guest prints its total as
 *   COUNT: irq_host=<n>
 * which the host compares with what it sent. */
#include "bench.h"

#define V_HOST 0x70
#define V_WAKE 0x71

static volatile u32 host_count, stop_flag;

static void host_handler(struct irq_frame *f, u32 cpu)
{
	host_count++;
	apic_eoi();
}

void guest_main(void)
{
	platform_init(false);
	irq_set_handler(V_HOST, host_handler);
	ioapic_set_entry(11, (u64)cpu_to_apic_id(0) << 56 | V_HOST);
	ioapic_set_entry(12, (u64)cpu_to_apic_id(0) << 56 | V_WAKE);
	printf("READY: count=%p stop=%p apic=%u\n", (void *)&host_count, (void *)&stop_flag, cpu_to_apic_id(0));
	cli();
	while (!READ_ONCE(stop_flag)) {
		sti_hlt();
		cli();
	}
	sti();
	ioapic_set_entry(11, IOAPIC_MASKED);
	ioapic_set_entry(12, IOAPIC_MASKED);
	printf("COUNT: irq_host=%u\n", host_count);
	pass("irq_host stopped by the host");
}
