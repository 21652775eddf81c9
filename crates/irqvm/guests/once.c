/* once: an interrupt is delivered exactly once, whatever state the target CPU is in when it is raised.
 *  - ExtINT from the 8259 (line 10 on the slave, edge, through CPU 0's LINT0 in ExtINT mode, SDM vol. 3 11.5.1):
 *    raised while CPU 0 is running (spinning), halted (sti; hlt), or has interrupts disabled (IF=0: held until
 *    sti, 8259A datasheet: the request stays in IRR until the INTA cycle). On 2+ CPUs the last CPU raises the
 *    line while CPU 0 waits; on 1 CPU, CPU 0 raises it itself and the halted case is skipped. Then the same
 *    request through the IOAPIC's entry for the line in ExtINT mode, LINT0 masked (virtual wire mode).
 *  - A level-triggered IOAPIC line (pin 11) held high across its EOI (82093AA 3.2.4, remote IRR; SDM vol. 3
 *    11.8.5): the handler lowers the line before its EOI, so the EOI must not deliver it again. To CPU 0, and
 *    to a halted AP on 2+ CPUs.
 * Checks tagged [isr-kept] need the LAPIC to keep the vector in ISR until the guest's EOI (see tpr.c): KVM's
 * in-kernel IOAPIC here sees the EOI while the handler has not yet lowered the line (kernel mode). */
#include "guest.h"

#define PIC_LINE 10
#define MASTER_BASE 0x30
#define SLAVE_BASE 0x38
#define V_PIC (SLAVE_BASE + (PIC_LINE - 8))
#define LEVEL_LINE 11
#define V_LEVEL 0x61
#define SETTLE_MS 30

static u32 raiser;                 /* CPU that pulses the PIC line: the last CPU, or CPU 0 alone */
static volatile u32 pulse_delay_ms;

static void pic_handler(struct irq_frame *f, u32 cpu) { pic_eoi(PIC_LINE); }

static void pulse_pic_line(void *unused)
{
	delay_ms(pulse_delay_ms);
	testdev_set_irq(PIC_LINE, 1);
	testdev_set_irq(PIC_LINE, 0);
}

/* Pulses the line from the raiser after `ms`; returns at once when another CPU does it. */
static void raise_later(u32 ms)
{
	pulse_delay_ms = ms;
	if (raiser == 0)
		pulse_pic_line(NULL);
	else
		smp_call_async(raiser, pulse_pic_line, NULL);
}

static void settle_raiser(void)
{
	if (raiser != 0)
		smp_wait(raiser, WAIT_MS);
}

static void extint_running(void)
{
	u32 n = irq_count[0][V_PIC];
	raise_later(5);
	bool got = wait_ge(&irq_count[0][V_PIC], n + 1, WAIT_MS);
	settle_raiser();
	delay_ms(SETTLE_MS);
	check(got && irq_count[0][V_PIC] == n + 1, "extint to a running cpu, exactly once", "%u interrupts",
	      irq_count[0][V_PIC] - n);
}

static void extint_halted(void)
{
	if (raiser == 0) {
		skip("extint to a halted cpu, exactly once", "needs a second CPU to raise the line");
		return;
	}
	u32 n = irq_count[0][V_PIC];
	raise_later(20);
	u64 start = rdtsc(), limit = ms_to_tsc(WAIT_MS);
	u32 halts = 0;
	while (irq_count[0][V_PIC] == n && rdtsc() - start < limit) {
		sti_hlt(); /* only the PIC can wake it: every other source is masked */
		halts++;
	}
	settle_raiser();
	delay_ms(SETTLE_MS);
	check(irq_count[0][V_PIC] == n + 1 && halts >= 1, "extint to a halted cpu, exactly once",
	      "%u interrupts after %u halts", irq_count[0][V_PIC] - n, halts);
}

static void extint_if_disabled(void)
{
	u32 n = irq_count[0][V_PIC];
	cli();
	raise_later(5);
	settle_raiser();
	delay_ms(SETTLE_MS);
	u32 held = irq_count[0][V_PIC] - n;
	bool in_irr = (pic_read_irr() & (1u << PIC_LINE)) != 0;
	sti();
	bool got = wait_ge(&irq_count[0][V_PIC], n + 1, WAIT_MS);
	delay_ms(SETTLE_MS);
	check(held == 0 && in_irr, "extint held while if=0", "%u interrupts with IF=0, IRR bit %u", held, in_irr);
	check(got && irq_count[0][V_PIC] == n + 1, "extint after sti, exactly once", "%u interrupts",
	      irq_count[0][V_PIC] - n);
}

/* Virtual wire mode through the I/O APIC (MultiProcessor Specification 1.4, §3.6.2): LINT0 masked, the line's
 * IOAPIC entry in ExtINT mode. The IOAPIC's ExtINT message makes CPU 0 acknowledge the 8259 and take its vector
 * (SDM vol. 3 §11.6.1, ExtINT), once. KVM's LAPIC accepts no ExtINT message (__apic_accept_irq), so `split` and
 * `kernel` take nothing and the request stays in the 8259's IRR. */
static void extint_virtual_wire(void)
{
	u32 n = irq_count[0][V_PIC];
	ioapic_set_entry(PIC_LINE, (u64)cpu_to_apic_id(0) << 56 | APIC_DM_EXTINT);
	raise_later(5);
	bool got = wait_ge(&irq_count[0][V_PIC], n + 1, 500);
	settle_raiser();
	delay_ms(SETTLE_MS);
	u32 irr = pic_read_irr();
	check(got && irq_count[0][V_PIC] == n + 1,
	      "extint through an ioapic entry in extint mode (virtual wire), exactly once [kvm-no-extint-msg]",
	      "%u interrupts, 8259 IRR %x", irq_count[0][V_PIC] - n, irr);
	ioapic_set_entry(PIC_LINE, IOAPIC_MASKED);
	if (pic_read_isr())
		pic_eoi(PIC_LINE);
}

static void extint(void)
{
	irq_set_handler(V_PIC, pic_handler);
	pic_init(MASTER_BASE, SLAVE_BASE);
	outb(0x4D1, inb(0x4D1) & ~(1u << (PIC_LINE - 8))); /* ELCR: edge */
	pic_set_mask((u16) ~((1u << PIC_LINE) | (1u << 2)));
	apic_write(APIC_LVT_LINT0, APIC_DM_EXTINT);
	extint_running();
	extint_halted();
	extint_if_disabled();
	apic_write(APIC_LVT_LINT0, APIC_LVT_MASKED | APIC_DM_EXTINT);
	extint_virtual_wire();
	pic_set_mask(0xFFFF);
}

/* The handler lowers the line, then EOIs: remote IRR clears with the line low, nothing is sent again. */
static void level_handler(struct irq_frame *f, u32 cpu)
{
	testdev_set_irq(LEVEL_LINE, 0);
	apic_eoi();
}

static void level_once_to(u32 cpu, const char *name)
{
	irq_set_handler(V_LEVEL, level_handler);
	u32 n = irq_count[cpu][V_LEVEL];
	ioapic_set_entry(LEVEL_LINE, (u64)cpu_to_apic_id(cpu) << 56 | IOAPIC_LEVEL | V_LEVEL);
	testdev_set_irq(LEVEL_LINE, 1);
	bool got = wait_ge(&irq_count[cpu][V_LEVEL], n + 1, WAIT_MS);
	delay_ms(SETTLE_MS);
	u64 entry = ioapic_get_entry(LEVEL_LINE);
	check(got && irq_count[cpu][V_LEVEL] == n + 1 && !(entry & IOAPIC_REMOTE_IRR), name,
	      "%u interrupts, remote irr %u", irq_count[cpu][V_LEVEL] - n, (entry & IOAPIC_REMOTE_IRR) != 0);
	ioapic_set_entry(LEVEL_LINE, IOAPIC_MASKED);
	testdev_set_irq(LEVEL_LINE, 0);
}

void guest_main(void)
{
	platform_init(false);
	if (ncpus >= 2) {
		raiser = ncpus - 1;
		if (!check(smp_start_ap(raiser), "ap online", "cpu %u did not start", raiser))
			raiser = 0;
	}
	extint();
	level_once_to(0, "level line lowered before eoi, exactly once [isr-kept]");
	if (raiser != 0)
		level_once_to(raiser, "level line to a halted ap, lowered before eoi, exactly once [isr-kept]");
	else
		skip("level line to a halted ap, lowered before eoi, exactly once [isr-kept]", "only %u CPU", ncpus);
}
