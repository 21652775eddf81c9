/* pic: the 8259A pair (datasheet: ICW1-4 initialization, OCW2 EOI, OCW3 IRR/ISR reads), routed to CPU 0
 * through LVT LINT0 in ExtINT mode (SDM vol. 3, 11.5.1) with the IOAPIC entry for the line masked.
 * pc-testdev line 10 is IRQ 10 on the slave (cascaded on master IRQ 2). ELCR (ports 0x4D0/0x4D1) is set to
 * edge for the line, since firmware may have made PCI-capable lines level-triggered. */
#include "guest.h"

#define LINE 10
#define MASTER_BASE 0x30
#define SLAVE_BASE 0x38
#define VEC (SLAVE_BASE + (LINE - 8))

static volatile u32 isr_in_handler, irr_in_handler;
static bool eoi_in_handler;
static void pic_handler(struct irq_frame *f, u32 cpu)
{
	isr_in_handler = pic_read_isr();
	irr_in_handler = pic_read_irr();
	if (eoi_in_handler)
		pic_eoi(LINE);
	/* ExtINT interrupts do not set the LAPIC's ISR: no LAPIC EOI. */
}

void guest_main(void)
{
	platform_init(false);
	const u16 bit = 1u << LINE, cascade = 1u << 2;
	irq_set_handler(VEC, pic_handler);
	pic_init(MASTER_BASE, SLAVE_BASE);
	outb(0x4D1, inb(0x4D1) & ~(1u << (LINE - 8))); /* ELCR: edge */
	check(pic_get_mask() == 0xFFFF, "imr reads back all masked", "IMR %x", pic_get_mask());
	check(pic_read_isr() == 0, "isr empty after init", "ISR %x", pic_read_isr());
	apic_write(APIC_LVT_LINT0, APIC_DM_EXTINT); /* unmasked, ExtINT */

	/* Masked in the IMR: the request is latched in IRR but not delivered. */
	testdev_set_irq(LINE, 1);
	delay_ms(20);
	u16 irr = pic_read_irr();
	check((irr & bit) && irq_count[0][VEC] == 0, "masked line latched in irr, not delivered",
	      "IRR %x, %u interrupts", irr, irq_count[0][VEC]);

	/* Unmask: the latched request is delivered with the slave's vector; the handler does not EOI. */
	eoi_in_handler = false;
	pic_set_mask(~(bit | cascade));
	check(pic_get_mask() == (u16)~(bit | cascade), "imr reads back", "IMR %x", pic_get_mask());
	bool got = wait_ge(&irq_count[0][VEC], 1, WAIT_MS);
	check(got && irq_last_vector[0] == VEC, "pic vector arrives through lint0 extint", "%u interrupts, last %x",
	      irq_count[0][VEC], irq_last_vector[0]);
	check((isr_in_handler & (bit | cascade)) == (bit | cascade), "isr has the line and the cascade",
	      "ISR %x in the handler", isr_in_handler);
	check(!(irr_in_handler & bit), "irr cleared by the acknowledge", "IRR %x in the handler", irr_in_handler);
	testdev_set_irq(LINE, 0);
	delay_ms(10);
	check(irq_count[0][VEC] == 1 && (pic_read_isr() & bit), "in service until eoi", "%u interrupts, ISR %x",
	      irq_count[0][VEC], pic_read_isr());
	pic_eoi(LINE);
	check(pic_read_isr() == 0, "ocw2 specific eoi clears isr", "ISR %x", pic_read_isr());

	/* A second edge, EOI in the handler. */
	eoi_in_handler = true;
	testdev_set_irq(LINE, 1);
	got = wait_ge(&irq_count[0][VEC], 2, WAIT_MS);
	testdev_set_irq(LINE, 0);
	delay_ms(10);
	check(got && irq_count[0][VEC] == 2 && pic_read_isr() == 0, "second edge, eoi in handler",
	      "%u interrupts, ISR %x", irq_count[0][VEC], pic_read_isr());

	/* LINT0 masked: the PIC's request does not reach the CPU. */
	apic_write(APIC_LVT_LINT0, APIC_LVT_MASKED | APIC_DM_EXTINT);
	testdev_set_irq(LINE, 1);
	delay_ms(30);
	check(irq_count[0][VEC] == 2, "masked lint0 blocks the pic", "%u interrupts", irq_count[0][VEC]);
	testdev_set_irq(LINE, 0);
	pic_set_mask(0xFFFF);
	/* Drop whatever the masked LINT0 left behind in the PIC. */
	if (pic_read_isr())
		pic_eoi(LINE);
}
