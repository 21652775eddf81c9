/* pic: the 8259A pair (datasheet: ICW1-4 initialization, OCW2 EOI, OCW3 IRR/ISR reads), routed to CPU 0
 * through LVT LINT0 in ExtINT mode (SDM vol. 3, 11.5.1) with the IOAPIC entry for the line masked.
 * pc-testdev line 10 is IRQ 10 on the slave (cascaded on master IRQ 2). ELCR (ports 0x4D0/0x4D1) is set to
 * edge for the line, since firmware may have made PCI-capable lines level-triggered.
 * The "kvm:" checks pin down where KVM's in-kernel PIC (the reference for every mode) departs from the
 * datasheet or fills a gap it leaves: power-on IMR 0, the poll command, ICW1 keeping ISR, special mask mode,
 * ICW1 SNGL and LTIM, a chip in mid-initialization, ELCR writes. */
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

static u8 poll(u16 cmd)
{
	outb(cmd, 0x0C); /* OCW3: poll */
	return inb(cmd);
}
static u8 read_reg(u16 cmd, u8 ocw3)
{
	outb(cmd, ocw3);
	return inb(cmd);
}
static void pulse(u32 line)
{
	testdev_set_irq(line, 1);
	testdev_set_irq(line, 0);
}

/* KVM's PIC where the datasheet leaves room or KVM departs from it. LINT0 is masked: nothing is acknowledged
 * by the CPU, the poll command and OCW3 reads show the chips' state. */
static void kvm_semantics(void)
{
	const u16 m = 0x20, s = 0xA0;
	apic_write(APIC_LVT_LINT0, APIC_LVT_MASKED | APIC_DM_EXTINT);
	pic_init(MASTER_BASE, SLAVE_BASE);
	pic_set_mask(~(u16)((1u << 5) | (1u << 6)));
	pulse(6);
	pulse(5);
	u8 w1 = poll(m), isr = read_reg(m, 0x0B), w2 = poll(m), w3 = poll(m);
	/* Datasheet: the poll read acknowledges (sets ISR) and IR5 in service would block IR6. */
	check(w1 == 0x85 && isr == 0 && w2 == 0x86, "kvm, poll takes the request without putting it in service",
	      "poll %x, ISR %x, poll %x", w1, isr, w2);
	check(w3 == 0x07, "kvm, poll with nothing pending reads 07", "poll %x", w3);

	/* Special mask mode: a masked, in-service level still blocks (datasheet: it would not). */
	pic_set_mask(~(u16)((1u << 2) | (1u << 10) | (1u << 11)));
	eoi_in_handler = false;
	u32 n = irq_count[0][VEC];
	apic_write(APIC_LVT_LINT0, APIC_DM_EXTINT);
	testdev_set_irq(LINE, 1);
	bool got = wait_ge(&irq_count[0][VEC], n + 1, WAIT_MS);
	testdev_set_irq(LINE, 0);
	apic_write(APIC_LVT_LINT0, APIC_LVT_MASKED | APIC_DM_EXTINT);
	pulse(11);
	outb(s, 0x68); /* OCW3: set special mask mode */
	outb(0xA1, inb(0xA1) | (1u << (LINE - 8)));
	u8 w = poll(s);
	outb(s, 0x48); /* OCW3: reset special mask mode */
	check(got && w == 0x07, "kvm, special mask mode does not unblock lower levels", "%s, slave poll %x",
	      got ? "in service" : "no interrupt", w);

	/* ICW1 keeps ISR (the datasheet's list of what ICW1 does leaves ISR out). */
	u16 before = pic_read_isr();
	pic_init(MASTER_BASE, SLAVE_BASE);
	u16 after = pic_read_isr();
	check(before == (1u << LINE | 1u << 2) && after == before, "kvm, icw1 keeps isr", "ISR %x, then %x", before,
	      after);
	pic_eoi(LINE);

	/* ICW1 with SNGL: KVM still takes ICW3, so the third byte is ICW4 and the IMR is still 0 after it. */
	outb(m, 0x13);
	outb(0x21, MASTER_BASE);
	outb(0x21, 0x01);
	outb(0x21, 0x5A);
	u8 imr = inb(0x21);
	pic_init(MASTER_BASE, SLAVE_BASE);
	check(imr == 0, "kvm, icw1 single mode still expects icw3", "IMR %x", imr);

	/* ICW1 with LTIM: ignored, an edge is still latched. */
	outb(m, 0x19);
	outb(0x21, MASTER_BASE);
	outb(0x21, 0x04);
	outb(0x21, 0x01);
	pic_set_mask(0xFFFF);
	pulse(7);
	u8 irr = read_reg(m, 0x0A);
	pic_init(MASTER_BASE, SLAVE_BASE);
	check(irr & 0x80, "kvm, icw1 ltim ignored, pulse latched", "IRR %x", irr);

	/* Between ICW1 and ICW4 the chip still requests (ICW1 cleared the IMR). */
	outb(m, 0x11);
	pulse(5);
	w = poll(m);
	pic_init(MASTER_BASE, SLAVE_BASE);
	check(w == 0x85, "kvm, a chip in mid-initialization still requests", "poll %x", w);

	/* An ELCR write does not resample IRR: an edge latched before the switch to level stays. */
	pulse(5);
	u8 elcr = inb(0x4D0);
	outb(0x4D0, elcr | 0x20);
	irr = read_reg(m, 0x0A);
	pulse(5); /* a level request follows the line: it ends low */
	u8 irr_low = read_reg(m, 0x0A);
	outb(0x4D0, elcr);
	check((irr & 0x20) && !(irr_low & 0x20), "kvm, elcr write keeps a latched edge", "IRR %x, then %x", irr,
	      irr_low);
	pic_set_mask(0xFFFF);
}

void guest_main(void)
{
	u16 boot_imr = inb(0x21) | (u16)inb(0xA1) << 8;
	platform_init(false);
	check(boot_imr == 0, "kvm, imr is 0 at power-on", "IMR %x", boot_imr);
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

	kvm_semantics();

	/* LINT0 masked: the PIC's request does not reach the CPU. */
	pic_set_mask(~(bit | cascade));
	apic_write(APIC_LVT_LINT0, APIC_LVT_MASKED | APIC_DM_EXTINT);
	u32 before = irq_count[0][VEC];
	testdev_set_irq(LINE, 1);
	delay_ms(30);
	check(irq_count[0][VEC] == before, "masked lint0 blocks the pic", "%u more interrupts",
	      irq_count[0][VEC] - before);
	testdev_set_irq(LINE, 0);
	pic_set_mask(0xFFFF);
	/* Drop whatever the masked LINT0 left behind in the PIC. */
	if (pic_read_isr())
		pic_eoi(LINE);
}
