/* ioapic: redirection entries for ISA lines driven through pc-testdev (port 0x2000 + n; under QEMU ISA IRQ n
 * is IOAPIC pin n for n != 0). 82093AA datasheet, section 3.2.4 (redirection table), and SDM vol. 3, 11.8.4
 * (EOI to the I/O APIC for level-triggered interrupts).
 *  - edge: one rising edge, one interrupt; a line held high does not re-interrupt;
 *  - level: held high -> one interrupt, Remote IRR set until the EOI, TMR set in the LAPIC, delivered again
 *    after the EOI while still high, not after the line is lowered;
 *  - mask: a masked level entry delivers nothing while masked and delivers once unmasked if the line is
 *    still high. (A masked edge is not asserted either way on unmask: QEMU latches it, the 82093AA drops it.)
 * Checks tagged [isr-kept] need the LAPIC to keep the vector in ISR until EOI (see tpr.c). */
#include "guest.h"

#define EDGE_LINE 10
#define LEVEL_LINE 11
#define V_EDGE 0x70
#define V_LEVEL 0x71
#define V_MASKED 0x72

static bool level_eoi_in_handler;
static volatile u32 remote_irr_in_handler, tmr_in_handler;
static void level_handler(struct irq_frame *f, u32 cpu)
{
	remote_irr_in_handler = (ioapic_get_entry(LEVEL_LINE) & IOAPIC_REMOTE_IRR) != 0;
	tmr_in_handler = apic_vector_bit(APIC_TMR, V_LEVEL);
	if (level_eoi_in_handler)
		apic_eoi();
}
static bool remote_irr(u32 pin) { return (ioapic_get_entry(pin) & IOAPIC_REMOTE_IRR) != 0; }

static void basics(void)
{
	u32 ver = ioapic_read(IOAPIC_VER);
	check((ver & 0xFF) >= 0x11 && ioapic_pin_count() >= 24, "ioapic version and 24 pins", "version reg %x",
	      ver);
	ioapic_set_entry(EDGE_LINE, IOAPIC_MASKED | 0x12345 /* junk in low bits, masked */);
	ioapic_set_entry(EDGE_LINE, ((u64)0xAB << 56) | IOAPIC_MASKED | V_EDGE);
	u64 e = ioapic_get_entry(EDGE_LINE);
	check((e & 0xFF) == V_EDGE && (e >> 56) == 0xAB && (e & IOAPIC_MASKED), "redirection entry reads back",
	      "%lx", e);

	/* Where KVM's IOAPIC fills what the 82093AA leaves reserved or undefined (section 3.2): registers
	 * 0x03-0x0F and entries past the last pin read all ones; the reserved entry bits 55:17 are stored and
	 * read back; a byte write to IOWIN is zero-extended to the whole dword. */
	u32 undef = ioapic_read(0x03), past = ioapic_read(IOAPIC_REDTBL(ioapic_pin_count()));
	check(undef == 0xFFFFFFFF && past == 0xFFFFFFFF, "kvm, undefined registers read all ones",
	      "register 3 %x, past the table %x", undef, past);
	u64 reserved = 0x0000FFFF00000000ul | 0xFFFE0000ul | IOAPIC_MASKED | V_EDGE;
	ioapic_set_entry(EDGE_LINE, reserved);
	e = ioapic_get_entry(EDGE_LINE);
	check(e == reserved, "kvm, reserved entry bits read back", "wrote %lx, read %lx", reserved, e);
	ioapic_set_entry(EDGE_LINE, IOAPIC_MASKED);
	*(volatile u32 *)0xFEC00000ul = IOAPIC_REDTBL(EDGE_LINE);
	*(volatile u8 *)0xFEC00010ul = 0x55;
	u32 low = ioapic_read(IOAPIC_REDTBL(EDGE_LINE));
	ioapic_set_entry(EDGE_LINE, IOAPIC_MASKED);
	check(low == 0x55, "kvm, byte write to iowin is zero-extended", "low dword %x", low);
}

static void edge(void)
{
	ioapic_set_entry(EDGE_LINE, (u64)cpu_to_apic_id(0) << 56 | V_EDGE); /* fixed, physical, edge, high */
	testdev_set_irq(EDGE_LINE, 1);
	check(wait_ge(&irq_count[0][V_EDGE], 1, WAIT_MS), "edge, rising edge interrupts", "no interrupt");
	delay_ms(20);
	check(irq_count[0][V_EDGE] == 1, "edge, held line interrupts once", "%u interrupts", irq_count[0][V_EDGE]);
	check(!remote_irr(EDGE_LINE), "edge, remote irr stays clear", "entry %lx", ioapic_get_entry(EDGE_LINE));
	testdev_set_irq(EDGE_LINE, 0);
	testdev_set_irq(EDGE_LINE, 1);
	check(wait_ge(&irq_count[0][V_EDGE], 2, WAIT_MS), "edge, second edge interrupts again", "%u interrupts",
	      irq_count[0][V_EDGE]);
	testdev_set_irq(EDGE_LINE, 0);
	delay_ms(10);
	check(irq_count[0][V_EDGE] == 2, "edge, falling edge does not interrupt", "%u interrupts",
	      irq_count[0][V_EDGE]);
	ioapic_set_entry(EDGE_LINE, IOAPIC_MASKED);
}

static void level(void)
{
	irq_set_handler(V_LEVEL, level_handler);
	level_eoi_in_handler = false;
	ioapic_set_entry(LEVEL_LINE, (u64)cpu_to_apic_id(0) << 56 | IOAPIC_LEVEL | V_LEVEL);
	testdev_set_irq(LEVEL_LINE, 1);
	bool got = wait_ge(&irq_count[0][V_LEVEL], 1, WAIT_MS);
	check(got, "level, held line interrupts", "no interrupt");
	check(remote_irr_in_handler, "level, remote irr set in the handler", "entry %lx",
	      ioapic_get_entry(LEVEL_LINE));
	check(tmr_in_handler, "level, lapic tmr bit set", "TMR bit for %x clear", V_LEVEL);
	delay_ms(30);
	/* The handler did not EOI: Remote IRR blocks a second message; the LAPIC's ISR would block it as well. */
	check(irq_count[0][V_LEVEL] == 1 && remote_irr(LEVEL_LINE), "level, no redelivery before eoi [isr-kept]",
	      "%u interrupts, remote irr %u", irq_count[0][V_LEVEL], remote_irr(LEVEL_LINE));
	u32 n = irq_count[0][V_LEVEL];
	apic_eoi(); /* the EOI reaches the IOAPIC (TMR set): Remote IRR clears, the line is still high */
	check(wait_ge(&irq_count[0][V_LEVEL], n + 1, WAIT_MS), "level, redelivered after eoi while high",
	      "%u interrupts", irq_count[0][V_LEVEL]);
	delay_ms(10);
	n = irq_count[0][V_LEVEL];
	testdev_set_irq(LEVEL_LINE, 0);
	apic_eoi();
	delay_ms(30);
	check(irq_count[0][V_LEVEL] == n, "level, no redelivery after the line is lowered [isr-kept]", "%u more",
	      irq_count[0][V_LEVEL] - n);
	check(!remote_irr(LEVEL_LINE), "level, remote irr clear after eoi", "entry %lx",
	      ioapic_get_entry(LEVEL_LINE));

	/* With the EOI in the handler: one interrupt per raise of the line, no storm after it is lowered. */
	level_eoi_in_handler = true;
	n = irq_count[0][V_LEVEL];
	testdev_set_irq(LEVEL_LINE, 1);
	bool ok = wait_ge(&irq_count[0][V_LEVEL], n + 1, WAIT_MS);
	testdev_set_irq(LEVEL_LINE, 0);
	delay_ms(20);
	u32 m = irq_count[0][V_LEVEL];
	delay_ms(20);
	check(ok && irq_count[0][V_LEVEL] == m && !remote_irr(LEVEL_LINE), "level, eoi in handler, line lowered",
	      "%u interrupts, remote irr %u", irq_count[0][V_LEVEL] - n, remote_irr(LEVEL_LINE));
	ioapic_set_entry(LEVEL_LINE, IOAPIC_MASKED);
	irq_set_handler(V_LEVEL, NULL);
}

/* A level interrupt EOIed in its handler while the line is still high, the handler returning to `sti; hlt`:
 * the EOI must reach the I/O APIC (Remote IRR clears) and the still-high line interrupt again, waking the HLT.
 * In `split` mode the EOI goes from KVM's LAPIC to irqvm's I/O APIC as an exit that this host's KVM may keep
 * pending while the vCPU halts (backend/eoi_probe.rs). The second interrupt lowers the line. */
#define V_RETRIGGER 0x73
static volatile u32 retrigger_count;
static void retrigger_handler(struct irq_frame *f, u32 cpu)
{
	if (++retrigger_count == 2)
		testdev_set_irq(LEVEL_LINE, 0);
	apic_eoi();
}

static void level_eoi_then_hlt(void)
{
	irq_set_handler(V_RETRIGGER, retrigger_handler);
	retrigger_count = 0;
	ioapic_set_entry(LEVEL_LINE, V_RETRIGGER | IOAPIC_LEVEL);
	__asm__ volatile("cli");
	testdev_set_irq(LEVEL_LINE, 1);
	for (u32 i = 0; i < 10 && retrigger_count < 2; i++)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	__asm__ volatile("sti");
	/* Woken from HLT by the second interrupt; its handler lowered the line, so after its EOI reaches the
	 * I/O APIC Remote IRR stays clear. (KVM's own I/O APIC here may deliver once more first: [isr-kept].) */
	u32 woken = retrigger_count;
	delay_ms(10);
	check(woken >= 2 && !remote_irr(LEVEL_LINE), "level, eoi with the line high then hlt, delivered again",
	      "%u interrupts, remote irr %u", woken, remote_irr(LEVEL_LINE));
	testdev_set_irq(LEVEL_LINE, 0);
	ioapic_set_entry(LEVEL_LINE, IOAPIC_MASKED);
	irq_set_handler(V_RETRIGGER, NULL);
}

static void masked(void)
{
	/* Level entry, masked: raising the line delivers nothing. */
	ioapic_set_entry(LEVEL_LINE, (u64)cpu_to_apic_id(0) << 56 | IOAPIC_MASKED | IOAPIC_LEVEL | V_MASKED);
	testdev_set_irq(LEVEL_LINE, 1);
	delay_ms(30);
	check(irq_count[0][V_MASKED] == 0 && !remote_irr(LEVEL_LINE), "masked level entry holds",
	      "%u interrupts, remote irr %u", irq_count[0][V_MASKED], remote_irr(LEVEL_LINE));
	/* Unmasked with the line still high: delivered (the handler EOIs automatically), once the line drops. */
	ioapic_set_entry(LEVEL_LINE, (u64)cpu_to_apic_id(0) << 56 | IOAPIC_LEVEL | V_MASKED);
	bool got = wait_ge(&irq_count[0][V_MASKED], 1, WAIT_MS);
	testdev_set_irq(LEVEL_LINE, 0);
	check(got, "unmasking a held level line delivers", "no interrupt");
	ioapic_set_entry(LEVEL_LINE, IOAPIC_MASKED);

	/* Edge entry, masked: a rising edge delivers nothing while masked. */
	u32 n = irq_count[0][V_EDGE];
	ioapic_set_entry(EDGE_LINE, (u64)cpu_to_apic_id(0) << 56 | IOAPIC_MASKED | V_EDGE);
	testdev_set_irq(EDGE_LINE, 1);
	delay_ms(30);
	testdev_set_irq(EDGE_LINE, 0);
	check(irq_count[0][V_EDGE] == n, "masked edge entry delivers nothing", "%u interrupts",
	      irq_count[0][V_EDGE] - n);
}

/* 82093AA section 3.2.4: Remote IRR is set when a local APIC accepts the level interrupt. An entry aimed at an
 * APIC ID no CPU has sends the held line to nobody, so Remote IRR stays clear and nothing blocks the pin (KVM
 * alike: `ioapic_service` sets it only when the delivery reached a LAPIC); pointed at CPU 0 afterwards, the
 * entry write itself delivers the line still held. Its handler lowers the line. */
#define V_UNACCEPTED 0x74
#define ABSENT_APIC_ID 0x55
static void unaccepted_handler(struct irq_frame *f, u32 cpu)
{
	testdev_set_irq(LEVEL_LINE, 0);
	apic_eoi();
}

static void unaccepted(void)
{
	irq_set_handler(V_UNACCEPTED, unaccepted_handler);
	ioapic_set_entry(LEVEL_LINE, (u64)ABSENT_APIC_ID << 56 | IOAPIC_LEVEL | V_UNACCEPTED);
	testdev_set_irq(LEVEL_LINE, 1);
	delay_ms(20);
	u64 e = ioapic_get_entry(LEVEL_LINE);
	check(!(e & IOAPIC_REMOTE_IRR) && irq_count[0][V_UNACCEPTED] == 0,
	      "level, entry to an absent apic id leaves remote irr clear", "entry %lx, %u interrupts", e,
	      irq_count[0][V_UNACCEPTED]);
	ioapic_set_entry(LEVEL_LINE, (u64)cpu_to_apic_id(0) << 56 | IOAPIC_LEVEL | V_UNACCEPTED);
	bool got = wait_ge(&irq_count[0][V_UNACCEPTED], 1, WAIT_MS);
	testdev_set_irq(LEVEL_LINE, 0);
	delay_ms(10);
	check(got && !remote_irr(LEVEL_LINE), "level, retargeting the entry delivers the held line",
	      "%u interrupts, entry %lx", irq_count[0][V_UNACCEPTED], ioapic_get_entry(LEVEL_LINE));
	ioapic_set_entry(LEVEL_LINE, IOAPIC_MASKED);
	irq_set_handler(V_UNACCEPTED, NULL);
}

/* The ID, version and arbitration registers (82093AA sections 3.2.1-3.2.3; KVM's ioapic.c stores and returns the
 * same four bits): IOAPICID keeps bits 27:24 of a write and reads the others as 0; IOAPICARB reads those four
 * bits of the ID and ignores writes; IOAPICVER is read-only. The ID is put back afterwards (the MADT names it). */
#define IOAPIC_ARB 0x02
static void id_and_arbitration(void)
{
	u32 id = ioapic_read(IOAPIC_ID);
	ioapic_write(IOAPIC_ID, ~id);
	u32 flipped = ioapic_read(IOAPIC_ID);
	check((id ^ flipped) == 0x0F000000u, "id register keeps only bits 27-24 of a write",
	      "read %x, then %x after writing %x", id, flipped, ~id);
	ioapic_write(IOAPIC_ID, 0x0A000000u);
	u32 arb = ioapic_read(IOAPIC_ARB);
	ioapic_write(IOAPIC_ARB, 0x05000000u);
	u32 arb_after = ioapic_read(IOAPIC_ARB);
	check(arb == 0x0A000000u && arb_after == 0x0A000000u,
	      "arbitration register follows the id and ignores writes", "reads %x, %x after a write", arb,
	      arb_after);
	ioapic_write(IOAPIC_ID, id);
	u32 ver = ioapic_read(IOAPIC_VER);
	ioapic_write(IOAPIC_VER, ~ver);
	u32 ver_after = ioapic_read(IOAPIC_VER);
	check(ver_after == ver, "version register ignores writes", "read %x, then %x after writing %x", ver, ver_after,
	      ~ver);
}

/* TMR follows the trigger mode of each acceptance (SDM vol. 3 11.8.4): a level vector sets its bit, which stays
 * set through the EOI; the same vector accepted edge-triggered clears it. The handler records the bit and
 * lowers the line before its EOI. */
#define V_TMR 0x75
static volatile u32 tmr_seen;
static void tmr_handler(struct irq_frame *f, u32 cpu)
{
	tmr_seen = apic_vector_bit(APIC_TMR, V_TMR);
	testdev_set_irq(LEVEL_LINE, 0);
	apic_eoi();
}

static void tmr_follows_trigger(void)
{
	irq_set_handler(V_TMR, tmr_handler);
	tmr_seen = 0;
	ioapic_set_entry(LEVEL_LINE, (u64)cpu_to_apic_id(0) << 56 | IOAPIC_LEVEL | V_TMR);
	testdev_set_irq(LEVEL_LINE, 1);
	bool got = wait_ge(&irq_count[0][V_TMR], 1, WAIT_MS);
	delay_ms(10);
	bool after_eoi = apic_vector_bit(APIC_TMR, V_TMR);
	check(got && tmr_seen && after_eoi, "level vector's tmr bit stays set after its eoi",
	      "%u interrupts, TMR in the handler %u, after the EOI %u", irq_count[0][V_TMR], tmr_seen, after_eoi);
	ioapic_set_entry(LEVEL_LINE, (u64)cpu_to_apic_id(0) << 56 | V_TMR); /* same vector, edge */
	tmr_seen = 1;
	testdev_set_irq(LEVEL_LINE, 1);
	got = wait_ge(&irq_count[0][V_TMR], 2, WAIT_MS);
	testdev_set_irq(LEVEL_LINE, 0);
	check(got && !tmr_seen, "edge acceptance clears the tmr bit a level vector left", "%u interrupts, TMR %u",
	      irq_count[0][V_TMR], tmr_seen);
	ioapic_set_entry(LEVEL_LINE, IOAPIC_MASKED);
	irq_set_handler(V_TMR, NULL);
}

/* A level entry whose handler points it at another APIC (the high dword only) before its EOI: the EOI still
 * names the vector, so Remote IRR clears (82093AA 3.2.4; KVM matches EOIs to entries by vector) and the line,
 * lowered in the handler, delivers nothing more. The new destination is CPU 1 when there is one (idle, and the
 * line stays low), else an APIC ID no CPU has. */
#define V_RECONF 0x76
static volatile u32 reconf_dest;
static void reconf_handler(struct irq_frame *f, u32 cpu)
{
	testdev_set_irq(LEVEL_LINE, 0);
	ioapic_write(IOAPIC_REDTBL(LEVEL_LINE) + 1, reconf_dest << 24);
	apic_eoi();
}

static void retarget_in_handler(void)
{
	irq_set_handler(V_RECONF, reconf_handler);
	reconf_dest = ncpus >= 2 ? cpu_to_apic_id(1) : ABSENT_APIC_ID;
	ioapic_set_entry(LEVEL_LINE, (u64)cpu_to_apic_id(0) << 56 | IOAPIC_LEVEL | V_RECONF);
	testdev_set_irq(LEVEL_LINE, 1);
	bool got = wait_ge(&irq_count[0][V_RECONF], 1, WAIT_MS);
	delay_ms(20);
	u64 e = ioapic_get_entry(LEVEL_LINE);
	check(got && !(e & IOAPIC_REMOTE_IRR) && (e >> 56) == reconf_dest && irq_count_total(V_RECONF) == 1,
	      "level, entry retargeted in its handler, the eoi still clears remote irr [isr-kept]",
	      "%u interrupts, entry %lx", irq_count_total(V_RECONF), e);
	ioapic_set_entry(LEVEL_LINE, IOAPIC_MASKED);
	irq_set_handler(V_RECONF, NULL);
}

/* A level line that drops, rises and drops again while its Remote IRR is set, all before the EOI: the pulse
 * is not remembered (the 82093AA samples a level input, it does not latch it), so after the EOI with the line
 * low nothing is delivered again. */
#define V_PULSE 0x77
static void pulse_handler(struct irq_frame *f, u32 cpu)
{
	testdev_set_irq(LEVEL_LINE, 0);
	testdev_set_irq(LEVEL_LINE, 1);
	testdev_set_irq(LEVEL_LINE, 0);
	apic_eoi();
}

static void pulse_before_eoi(void)
{
	irq_set_handler(V_PULSE, pulse_handler);
	ioapic_set_entry(LEVEL_LINE, (u64)cpu_to_apic_id(0) << 56 | IOAPIC_LEVEL | V_PULSE);
	testdev_set_irq(LEVEL_LINE, 1);
	bool got = wait_ge(&irq_count[0][V_PULSE], 1, WAIT_MS);
	delay_ms(30);
	check(got && irq_count[0][V_PULSE] == 1 && !remote_irr(LEVEL_LINE),
	      "level, a pulse while remote irr is set is not delivered after the eoi [isr-kept]",
	      "%u interrupts, remote irr %u", irq_count[0][V_PULSE], remote_irr(LEVEL_LINE));
	ioapic_set_entry(LEVEL_LINE, IOAPIC_MASKED);
	irq_set_handler(V_PULSE, NULL);
}

/* Delivery to an AP through a physical destination (the AP counts the vector). */
static void to_ap(void)
{
	if (ncpus < 2) {
		skip("edge interrupt to an ap", "only %u CPU", ncpus);
		return;
	}
	u32 ap = ncpus - 1;
	if (!check(smp_start_ap(ap), "ap online", "cpu %u did not start", ap))
		return;
	ioapic_set_entry(EDGE_LINE, (u64)cpu_to_apic_id(ap) << 56 | V_EDGE);
	u32 b0 = irq_count[0][V_EDGE];
	testdev_set_irq(EDGE_LINE, 1);
	bool ok = wait_ge(&irq_count[ap][V_EDGE], 1, WAIT_MS);
	testdev_set_irq(EDGE_LINE, 0);
	check(ok && irq_count[0][V_EDGE] == b0, "edge interrupt to an ap", "AP took %u, BSP %u more",
	      irq_count[ap][V_EDGE], irq_count[0][V_EDGE] - b0);
	ioapic_set_entry(EDGE_LINE, IOAPIC_MASKED);
}

/* Directed EOI (SDM vol. 3 §11.8.5; the IOxAPIC EOI register at 0x40, IOAPIC version 20H): with SVR bit 12 set
 * the LAPIC's EOI of a level vector is not broadcast, so Remote IRR stays set and a line still high is not
 * delivered again until the guest writes the vector to the I/O APIC's EOI register. Offered where the APIC
 * version's bit 24 says so: `user` mode, and `split` mode (KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST, without
 * which KVM broadcast the EOI anyway); KVM's own I/O APIC has no EOI register and KVM offers none in `kernel`. */
#define V_DIRECTED 0x78
static volatile u32 directed_count;
static void directed_handler(struct irq_frame *f, u32 cpu)
{
	directed_count++;
	apic_eoi();
}

static void directed_eoi(void)
{
	const char *held = "directed eoi, a suppressed broadcast leaves remote irr set and the line undelivered";
	const char *again = "directed eoi, the ioapic eoi register delivers the held line again";
	const char *clear = "directed eoi, the ioapic eoi register clears remote irr";
	if (!((apic_read(APIC_VERSION) >> 24) & 1)) {
		skip(held, "APIC version %x offers no directed EOI", apic_read(APIC_VERSION));
		skip(again, "no directed EOI");
		skip(clear, "no directed EOI");
		return;
	}
	u32 svr = apic_read(APIC_SVR);
	irq_set_handler(V_DIRECTED, directed_handler);
	directed_count = 0;
	apic_write(APIC_SVR, svr | APIC_SVR_SUPPRESS_EOI_BROADCAST);
	ioapic_set_entry(LEVEL_LINE, V_DIRECTED | IOAPIC_LEVEL);
	testdev_set_irq(LEVEL_LINE, 1);
	wait_ge(&directed_count, 1, WAIT_MS);
	delay_ms(20);
	u32 first = directed_count;
	bool irr_held = remote_irr(LEVEL_LINE);
	check(first == 1 && irr_held, held, "taken %u times, remote irr %u", first, irr_held);
	ioapic_eoi(V_DIRECTED);
	wait_ge(&directed_count, 2, WAIT_MS);
	delay_ms(20);
	u32 second = directed_count;
	check(second == 2 && remote_irr(LEVEL_LINE), again, "taken %u times in all, remote irr %u", second,
	      remote_irr(LEVEL_LINE));
	testdev_set_irq(LEVEL_LINE, 0);
	ioapic_eoi(V_DIRECTED);
	delay_ms(20);
	check(!remote_irr(LEVEL_LINE) && directed_count == 2, clear, "remote irr %u, taken %u times in all",
	      remote_irr(LEVEL_LINE), directed_count);
	ioapic_set_entry(LEVEL_LINE, IOAPIC_MASKED);
	apic_write(APIC_SVR, svr);
	irq_set_handler(V_DIRECTED, NULL);
}

void guest_main(void)
{
	platform_init(false);
	basics();
	edge();
	level();
	level_eoi_then_hlt();
	masked();
	unaccepted();
	id_and_arbitration();
	tmr_follows_trigger();
	pulse_before_eoi();
	to_ap();
	retarget_in_handler();
	directed_eoi();
}
