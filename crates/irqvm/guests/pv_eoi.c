/* pv_eoi: KVM's paravirtual end of interrupt (KVM_FEATURE_PV_EOI, CPUID 0x40000001 EAX bit 6; MSR_KVM_PV_EOI_EN
 * 0x4b564d04), as Linux Documentation/virt/kvm/x86/msr.rst and cpuid.rst define it and KVM implements it
 * (arch/x86/kvm/x86.c, MSR_KVM_PV_EOI_EN; lapic.c, kvm_lapic_set_pv_eoi, apic_sync_pv_eoi_to_guest and
 * apic_sync_pv_eoi_from_guest, kvm_lapic_reset).
 *
 * The MSR: bit 0 enables; bits 63:2 are the 4-byte aligned guest-physical address of a 32-bit word in guest RAM;
 * bit 1 is reserved. A write whose address part is not 4-byte aligned raises #GP with or without bit 0; an
 * enabling write whose word is not in guest RAM raises #GP; a disabled value is only checked for alignment.
 * RDMSR returns what was written; INIT sets it back to 0.
 *
 * The word: while the guest runs the handler of a vector that needs no EOI of its own (the only vector in
 * service, none waiting in IRR, not one whose EOI the IOAPIC must see), the hypervisor may set bit 0. The guest's
 * EOI then clears bit 0 with one instruction (BTR, as Linux's kvm_guest_apic_eoi_write does) and, if it was set,
 * writes no EOI register: the hypervisor retires the vector at its next exit. A clear bit means a normal EOI
 * write, and a guest may always ignore the bit and write EOI (the hypervisor must then not EOI again).
 *
 *  1. CPUID: the KVM signature and the feature bit.
 *  2. The MSR: 0 at start, #GP for a misaligned address and for an enabled word outside RAM, exact read-back.
 *  3. A self-IPI's handler finds the bit set and skips the EOI write; at the next exit the vector has left ISR
 *     (PPR 0) and the same vector is taken again, once per send.
 *  4. Two vectors pending with IF=0: the higher one's handler finds the bit clear (a vector waits in IRR), the
 *     lower one comes after its EOI and finds it set.
 *  5. A level-triggered IOAPIC vector: the bit stays clear (the EOI must reach the IOAPIC).
 *  6. A handler may ignore the bit and write EOI: the hypervisor must not EOI again. Alone (the next vector,
 *     taken inside that handler, stays in service) and nested (an outer vector's handler enables interrupts, a
 *     higher-class inner vector arrives and its handler writes EOI whatever the bit says; the outer vector
 *     stays in ISR until its own EOI).
 *  7. Writing 0 turns it off: the next handler finds the bit clear.
 *  8. (2+ CPUs) On an AP: the bit is set in its handler; after INIT-SIPI-SIPI the MSR reads 0 and the bit stays
 *     clear.
 *  9. Check 3 again in x2APIC mode (Linux uses PV EOI in both modes).
 * Every vector sent is counted by the library (irq_count) and by this guest: the last check compares them.
 * Handlers never printf; the checks are made by the interrupted code afterwards. */
#include "guest.h"

#define KVM_MSR_ENABLED 1ul
#define KVM_FEATURE_PV_EOI (1u << 6)
#define GP_CAUGHT (13 + 1) /* rdmsr_catch / wrmsr_catch: vector + 1 */

#define V_PV 0x51     /* class 5: checks 3 and 7 */
#define V_LOW 0x41    /* class 4 \ check 4 */
#define V_HIGH 0x61   /* class 6 / */
#define V_LEVEL 0x71  /* check 5, IOAPIC pin LEVEL_LINE */
#define V_OUTER 0x53  /* class 5 \ check 6 */
#define V_INNER 0x73  /* class 7 / */
#define V_IGN 0x54    /* class 5 \ check 6, not nested */
#define V_NEXT 0x64   /* class 6 / */
#define V_AP 0x55     /* check 8 */
#define V_X2 0x57     /* check 9 */
#define LEVEL_LINE 11
#define ROUNDS 3
#define SETTLE_MS 20  /* how long "no second delivery" is watched for */

/* One word per CPU, each on a line of its own (the ABI asks only for 4-byte alignment). */
static struct {
	volatile u32 word;
	u32 pad[15];
} pv[MAX_CPUS] __attribute__((aligned(64)));

static u64 pv_word_gpa(u32 cpu) { return (u64)&pv[cpu].word; } /* the guest's page tables map RAM 1:1 */

/* The guest half of the protocol: BTR clears bit 0 in one instruction and reports in CF whether it was set. */
static bool pv_take(u32 cpu)
{
	bool was;
	__asm__ volatile("btrl $0, %0" : "+m"(pv[cpu].word), "=@ccc"(was) : : "memory");
	return was;
}
/* Linux's EOI with PV EOI on: write EOI only if the hypervisor did not offer to do it. Returns the bit. */
static bool pv_eoi(u32 cpu)
{
	bool was = pv_take(cpu);
	if (!was)
		apic_eoi();
	return was;
}

static bool pv_enable(u32 cpu)
{
	pv[cpu].word = 0;
	return wrmsr_catch(MSR_KVM_PV_EOI_EN, pv_word_gpa(cpu) | KVM_MSR_ENABLED) == 0;
}
static u64 pv_msr(void)
{
	u64 v;
	return rdmsr_catch(MSR_KVM_PV_EOI_EN, &v) ? ~0ul : v;
}

/* Sends are counted per vector; the last check compares them with what the library's dispatcher counted. */
static volatile u32 sent[256];
static void self_ipi(u32 v)
{
	sent[v]++;
	apic_icr_write(0, APIC_SH_SELF | v);
}
/* ISR and PPR of this CPU: also the exit at which a hypervisor retires a vector whose EOI the guest skipped. */
struct lapic_view {
	u32 isr, ppr;
};
static struct lapic_view view(u32 v)
{
	return (struct lapic_view){ apic_vector_bit(APIC_ISR, v), apic_read(APIC_PPR) };
}

/* ---- 1: CPUID ---- */
static bool pv_eoi_offered(void)
{
	u32 max, b, c, d, a;
	cpuid(0x40000000, 0, &max, &b, &c, &d);
	/* "KVMKVMKVM\0\0\0" in EBX, ECX, EDX (cpuid.rst). */
	bool kvm = b == 0x4b4d564b && c == 0x564b4d56 && d == 0x4d && max >= 0x40000001;
	if (!check(kvm, "cpuid 0x40000000 has the kvm signature", "EAX %x EBX %x ECX %x EDX %x", max, b, c, d))
		return false;
	cpuid(0x40000001, 0, &a, &b, &c, &d);
	return check(a & KVM_FEATURE_PV_EOI, "cpuid 0x40000001 advertises pv eoi", "EAX %x", a);
}

/* ---- 2: the MSR ---- */
static u64 unbacked_high(void)
{
	/* Half of MAXPHYADDR's range (CPUID 80000008H EAX[7:0], 36 without the leaf), or past the end of RAM
	 * (RAM is 0-3 GiB, then from 4 GiB on) if that is further. */
	u32 max, a, b, c, d;
	cpuid(0x80000000, 0, &max, &b, &c, &d);
	u32 phys = 36;
	if (max >= 0x80000008) {
		cpuid(0x80000008, 0, &a, &b, &c, &d);
		phys = a & 0xFF;
	}
	u64 ram = fwcfg_ram_size(), end = ram <= 0xC0000000ul ? ram : 0x100000000ul + ram - 0xC0000000ul;
	u64 high = 1ul << (phys - 1);
	return high > end ? high : (end + 0x200000) & ~0x1FFFFFul;
}

static void msr_checks(void)
{
	u64 v = 0;
	u32 e = rdmsr_catch(MSR_KVM_PV_EOI_EN, &v);
	check(e == 0 && v == 0, "msr reads 0 at start", "fault %u, value %lx", e, v);

	u64 gpa = pv_word_gpa(0);
	e = wrmsr_catch(MSR_KVM_PV_EOI_EN, gpa | 2 | KVM_MSR_ENABLED);
	check(e == GP_CAUGHT && pv_msr() == 0, "misaligned enabling write raises gp", "fault %u, msr %lx", e, pv_msr());
	e = wrmsr_catch(MSR_KVM_PV_EOI_EN, gpa | 2);
	check(e == GP_CAUGHT && pv_msr() == 0, "misaligned disabled write raises gp", "fault %u, msr %lx", e, pv_msr());

	/* Not RAM: the 32-bit device hole (irqvm's RAM stops at 3 GiB below 4 GiB), and far above RAM. */
	u64 hole = 0xF0000000ul, high = unbacked_high();
	u32 e_hole = wrmsr_catch(MSR_KVM_PV_EOI_EN, hole | KVM_MSR_ENABLED);
	u32 e_high = wrmsr_catch(MSR_KVM_PV_EOI_EN, high | KVM_MSR_ENABLED);
	check(e_hole == GP_CAUGHT && e_high == GP_CAUGHT && pv_msr() == 0, "enabling write outside ram raises gp",
	      "%lx: fault %u, %lx: fault %u, msr %lx", hole, e_hole, high, e_high, pv_msr());

	pv[0].word = 0;
	e = wrmsr_catch(MSR_KVM_PV_EOI_EN, gpa | KVM_MSR_ENABLED);
	v = pv_msr();
	check(e == 0 && v == (gpa | KVM_MSR_ENABLED), "enabling write reads back exactly", "fault %u, wrote %lx, read %lx",
	      e, gpa | KVM_MSR_ENABLED, v);

	/* Disabled, only the alignment is checked: neither 0x1000 nor an address outside RAM faults. */
	u32 e_low = wrmsr_catch(MSR_KVM_PV_EOI_EN, 0x1000);
	u64 v_low = pv_msr();
	e_hole = wrmsr_catch(MSR_KVM_PV_EOI_EN, hole);
	u64 v_hole = pv_msr();
	check(e_low == 0 && v_low == 0x1000 && e_hole == 0 && v_hole == hole, "disabled aligned value is kept and reads back",
	      "0x1000: fault %u, read %lx; %lx: fault %u, read %lx", e_low, v_low, hole, e_hole, v_hole);
	e = wrmsr_catch(MSR_KVM_PV_EOI_EN, 0);
	check(e == 0 && pv_msr() == 0, "writing 0 reads back 0", "fault %u, msr %lx", e, pv_msr());
}

/* ---- 3, 7 and 9: one self-IPI at a time ---- */
static volatile u32 one_taken, one_bit;
static void one_handler(struct irq_frame *f, u32 cpu)
{
	one_bit = pv_eoi(cpu);
	one_taken++;
}

struct one_result {
	u32 rounds_set, taken, isr_left, ppr_left;
	bool ok_each;
};
/* ROUNDS self-IPIs of `v`, one at a time; after each, once the handler returned, an APIC read (an exit). */
static struct one_result one_rounds(u32 v)
{
	struct one_result r = { 0, 0, 0, 0, true };
	irq_set_handler(v, one_handler);
	one_taken = 0;
	for (u32 i = 0; i < ROUNDS; i++) {
		one_bit = 0;
		self_ipi(v);
		bool got = wait_ge(&one_taken, i + 1, WAIT_MS);
		struct lapic_view after = view(v);
		delay_ms(SETTLE_MS);
		r.rounds_set += got && one_bit;
		r.isr_left |= after.isr;
		r.ppr_left |= after.ppr;
		if (!got || one_taken != i + 1)
			r.ok_each = false;
	}
	r.taken = one_taken;
	irq_set_handler(v, NULL);
	return r;
}

static void skipped_eoi(u32 v, const char *set, const char *retired, const char *again)
{
	struct one_result r = one_rounds(v);
	check(r.rounds_set == ROUNDS, set, "bit set in %u of %u handlers", r.rounds_set, ROUNDS);
	check(!r.isr_left && !r.ppr_left, retired, "ISR bit %u, PPR %x after a handler that skipped its EOI", r.isr_left,
	      r.ppr_left);
	check(r.ok_each && r.taken == ROUNDS, again, "%u taken for %u sent", r.taken, ROUNDS);
}

/* ---- 4: a vector waiting in IRR ---- */
static volatile u32 order[4], norder, bit_high, bit_low;
static void pair_handler(struct irq_frame *f, u32 cpu)
{
	u32 v = (u32)f->vector;
	bool was = pv_eoi(cpu);
	if (v == V_HIGH)
		bit_high = was;
	else
		bit_low = was;
	if (norder < 4)
		order[norder] = v;
	norder++;
}
static void waiting_in_irr(void)
{
	irq_set_handler(V_LOW, pair_handler);
	irq_set_handler(V_HIGH, pair_handler);
	norder = 0;
	bit_high = bit_low = 2;
	cli();
	self_ipi(V_LOW);
	self_ipi(V_HIGH);
	sti();
	bool got = wait_ge(&norder, 2, WAIT_MS);
	struct lapic_view low = view(V_LOW), high = view(V_HIGH);
	delay_ms(SETTLE_MS);
	check(got && bit_high == 0, "bit clear while another vector waits in irr", "higher vector's handler: bit %u",
	      bit_high);
	check(norder == 2 && order[0] == V_HIGH && order[1] == V_LOW && !low.isr && !high.isr && !low.ppr,
	      "lower vector taken after the higher one's eoi, each once", "%u taken: %x %x; ISR %u %u, PPR %x", norder,
	      order[0], order[1], high.isr, low.isr, low.ppr);
	check(bit_low == 1, "lower vector then finds the bit set [isr-kept]", "bit %u", bit_low);
	irq_set_handler(V_LOW, NULL);
	irq_set_handler(V_HIGH, NULL);
}

/* ---- 5: a level-triggered IOAPIC vector ---- */
static volatile u32 level_taken, level_bit;
static void level_handler(struct irq_frame *f, u32 cpu)
{
	level_bit = pv_take(cpu);
	testdev_set_irq(LEVEL_LINE, 0);
	if (!level_bit)
		apic_eoi();
	level_taken++;
}
static bool remote_irr(void) { return (ioapic_get_entry(LEVEL_LINE) & IOAPIC_REMOTE_IRR) != 0; }
static void level_triggered(void)
{
	irq_set_handler(V_LEVEL, level_handler);
	level_taken = 0;
	level_bit = 2;
	ioapic_set_entry(LEVEL_LINE, (u64)cpu_to_apic_id(0) << 56 | IOAPIC_LEVEL | V_LEVEL);
	testdev_set_irq(LEVEL_LINE, 1);
	bool got = wait_ge(&level_taken, 1, WAIT_MS);
	delay_ms(SETTLE_MS);
	bool rirr = remote_irr();
	check(got && level_bit == 0, "level-triggered vector gets no pv eoi bit", "taken %u, bit %u", level_taken,
	      level_bit);
	check(got && !rirr, "level-triggered vector's eoi reaches the ioapic", "taken %u, remote irr %u", level_taken,
	      rirr);
	check(level_taken == 1, "level-triggered vector taken once [isr-kept]", "%u interrupts for one assertion",
	      level_taken);
	testdev_set_irq(LEVEL_LINE, 0);
	ioapic_set_entry(LEVEL_LINE, IOAPIC_MASKED);
	irq_set_handler(V_LEVEL, NULL);
}

/* ---- 6: nesting, the inner handler ignoring the bit ---- */
static volatile u32 outer_taken, inner_taken, inner_bit, outer_bit;
static volatile struct lapic_view outer_mid, inner_mid;
static void inner_handler(struct irq_frame *f, u32 cpu)
{
	inner_bit = READ_ONCE(pv[cpu].word) & 1; /* read, left as it is */
	apic_eoi();
	inner_taken++;
}
static void outer_handler(struct irq_frame *f, u32 cpu)
{
	outer_taken++;
	sti();
	self_ipi(V_INNER);
	wait_ge(&inner_taken, 1, WAIT_MS);
	cli();
	/* The inner vector had its EOI: only the outer one may still be in service. */
	struct lapic_view o = view(V_OUTER);
	outer_mid.isr = o.isr;
	outer_mid.ppr = o.ppr;
	inner_mid.isr = apic_vector_bit(APIC_ISR, V_INNER);
	outer_bit = pv_eoi(cpu);
}
static void nested_ignoring(void)
{
	irq_set_handler(V_OUTER, outer_handler);
	irq_set_handler(V_INNER, inner_handler);
	outer_taken = inner_taken = 0;
	self_ipi(V_OUTER);
	bool got = wait_ge(&outer_taken, 1, WAIT_MS) && wait_ge(&inner_taken, 1, WAIT_MS);
	struct lapic_view after = view(V_OUTER);
	delay_ms(SETTLE_MS);
	printf("INFO: nested, inner handler saw bit %u, outer handler at its eoi %u\n", inner_bit, outer_bit);
	check(got && outer_mid.isr && !inner_mid.isr && outer_mid.ppr == 0x50,
	      "inner eoi written despite the bit retires only the inner vector [isr-kept]",
	      "taken %u/%u; after the inner EOI: ISR outer %u inner %u, PPR %x", outer_taken, inner_taken,
	      outer_mid.isr, inner_mid.isr, outer_mid.ppr);
	check(got && !after.isr && !after.ppr && outer_taken == 1 && inner_taken == 1,
	      "outer vector retired by its own eoi, each vector once", "taken %u/%u, ISR outer %u, PPR %x", outer_taken,
	      inner_taken, after.isr, after.ppr);
	irq_set_handler(V_OUTER, NULL);
	irq_set_handler(V_INNER, NULL);
}

/* ---- 6, not nested: a handler writes EOI although the bit is set, then the next vector arrives ---- */
static volatile u32 ign_taken, ign_bit, next_taken;
static volatile struct lapic_view next_in;
static void next_handler(struct irq_frame *f, u32 cpu)
{
	struct lapic_view v = view(V_NEXT);
	next_in.isr = v.isr;
	next_in.ppr = v.ppr;
	pv_eoi(cpu);
	next_taken++;
}
static void ignoring_handler(struct irq_frame *f, u32 cpu)
{
	ign_bit = READ_ONCE(pv[cpu].word) & 1; /* read, left as it is */
	apic_eoi();
	ign_taken++;
	/* A hypervisor that also took the bit as an EOI of its own would retire the next vector in service. */
	sti();
	self_ipi(V_NEXT);
	wait_ge(&next_taken, 1, WAIT_MS);
	cli();
}
static void ignored_bit(void)
{
	irq_set_handler(V_IGN, ignoring_handler);
	irq_set_handler(V_NEXT, next_handler);
	ign_taken = next_taken = 0;
	ign_bit = 2;
	self_ipi(V_IGN);
	bool got = wait_ge(&ign_taken, 1, WAIT_MS) && wait_ge(&next_taken, 1, WAIT_MS);
	struct lapic_view after = view(V_NEXT);
	delay_ms(SETTLE_MS);
	check(got && ign_bit == 1 && next_in.isr && next_in.ppr == 0x60,
	      "eoi written despite a set bit is not repeated on the next vector [isr-kept]",
	      "taken %u/%u, bit %u; the next vector in its handler: ISR %u, PPR %x", ign_taken, next_taken, ign_bit,
	      next_in.isr, next_in.ppr);
	check(got && ign_taken == 1 && next_taken == 1 && !after.isr && !after.ppr,
	      "after an eoi written despite the bit each vector is taken once and retired",
	      "taken %u/%u, ISR %u, PPR %x", ign_taken, next_taken, after.isr, after.ppr);
	irq_set_handler(V_IGN, NULL);
	irq_set_handler(V_NEXT, NULL);
}

/* ---- 7: writing 0 turns it off ---- */
static void disabled(void)
{
	u32 e = wrmsr_catch(MSR_KVM_PV_EOI_EN, 0);
	pv[0].word = 0;
	irq_set_handler(V_PV, one_handler);
	one_taken = 0;
	one_bit = 2;
	self_ipi(V_PV);
	bool got = wait_ge(&one_taken, 1, WAIT_MS);
	struct lapic_view after = view(V_PV);
	delay_ms(SETTLE_MS);
	check(e == 0 && got && one_bit == 0 && pv[0].word == 0, "after writing 0 the handler finds the bit clear",
	      "fault %u, taken %u, bit %u, word %x", e, one_taken, one_bit, pv[0].word);
	check(got && one_taken == 1 && !after.isr && !after.ppr, "after writing 0 the eoi write retires the vector",
	      "taken %u, ISR %u, PPR %x", one_taken, after.isr, after.ppr);
	irq_set_handler(V_PV, NULL);
}

/* ---- 8: an AP, and INIT ---- */
static volatile u32 ap_taken, ap_bit;
static volatile u64 ap_msr;
static volatile u32 ap_enable_ok;
static volatile struct lapic_view ap_view;
static void ap_handler(struct irq_frame *f, u32 cpu)
{
	ap_bit = pv_eoi(cpu);
	ap_taken++;
}
static void ap_enable(void *unused)
{
	u32 cpu = this_cpu();
	ap_enable_ok = pv_enable(cpu);
	ap_msr = pv_msr();
}
static void ap_read(void *unused)
{
	u32 cpu = this_cpu();
	pv[cpu].word = 0; /* whatever a hypervisor left there before the INIT */
	ap_msr = pv_msr();
	struct lapic_view v = view(V_AP);
	ap_view.isr = v.isr;
	ap_view.ppr = v.ppr;
}
static bool ap_ipi(u32 ap)
{
	u32 n = ap_taken;
	ap_bit = 2;
	sent[V_AP]++;
	apic_icr_write(cpu_to_apic_id(ap), V_AP);
	bool got = wait_ge(&ap_taken, n + 1, WAIT_MS);
	delay_ms(SETTLE_MS);
	return got && ap_taken == n + 1;
}
static void on_an_ap(void)
{
	static const char *const names[] = {
		"ap enables pv eoi",
		"ap handler finds the bit set and its vector retires [isr-kept]",
		"ap msr reads 0 after init-sipi-sipi",
		"ap handler finds the bit clear after init",
	};
	if (ncpus < 2) {
		for (u32 i = 0; i < sizeof(names) / sizeof(names[0]); i++)
			skip(names[i], "only %u CPU", ncpus);
		return;
	}
	const u32 ap = 1;
	irq_set_handler(V_AP, ap_handler);
	ap_taken = 0;
	bool up = smp_start_ap(ap);
	bool called = up && smp_call(ap, ap_enable, NULL);
	u64 want = pv_word_gpa(ap) | KVM_MSR_ENABLED;
	check(called && ap_enable_ok && ap_msr == want, "ap enables pv eoi", "online %u, call %u, write ok %u, msr %lx",
	      up, called, ap_enable_ok, ap_msr);

	bool once = ap_ipi(ap);
	u32 bit = ap_bit;
	bool read = smp_call(ap, ap_read, NULL);
	check(once && bit == 1 && read && !ap_view.isr && !ap_view.ppr,
	      "ap handler finds the bit set and its vector retires [isr-kept]", "taken once %u, bit %u; then ISR %u PPR %x",
	      once, bit, ap_view.isr, ap_view.ppr);

	/* INIT-SIPI-SIPI (kvm_lapic_reset clears the MSR). */
	bool again = smp_start_ap(ap);
	ap_msr = ~0ul;
	read = again && smp_call(ap, ap_read, NULL);
	check(read && ap_msr == 0 && cpu_boot_count[ap] == 2, "ap msr reads 0 after init-sipi-sipi",
	      "restarted %u, boot count %u, msr %lx", again, cpu_boot_count[ap], ap_msr);
	once = ap_ipi(ap);
	bit = ap_bit;
	read = smp_call(ap, ap_read, NULL);
	check(once && bit == 0 && pv[ap].word == 0 && read && !ap_view.isr, "ap handler finds the bit clear after init",
	      "taken once %u, bit %u, word %x, ISR %u", once, bit, pv[ap].word, ap_view.isr);
	irq_set_handler(V_AP, NULL);
}

/* ---- 9: x2APIC mode ---- */
static void in_x2apic_mode(void)
{
	if (!apic_use_x2apic(true)) {
		fail("x2apic mode", "CPUID.1:ECX[21] is clear");
		return;
	}
	apic_enable();
	bool on = pv_enable(0);
	check(on && pv_msr() == (pv_word_gpa(0) | KVM_MSR_ENABLED), "x2apic, pv eoi enabled", "write ok %u, msr %lx", on,
	      pv_msr());
	skipped_eoi(V_X2, "x2apic, self-ipi handler finds the bit set [isr-kept]",
		    "x2apic, skipped eoi leaves isr empty and ppr 0", "x2apic, same vector taken again, once per send");
	wrmsr_catch(MSR_KVM_PV_EOI_EN, 0);
}

/* The level-triggered vector has a check of its own: KVM's IOAPIC here delivers it again ([isr-kept]). */
static void counts(void)
{
	static const u32 vectors[] = { V_PV, V_LOW, V_HIGH, V_OUTER, V_INNER, V_IGN, V_NEXT, V_AP, V_X2 };
	bool ok = true;
	for (u32 i = 0; i < sizeof(vectors) / sizeof(vectors[0]); i++) {
		u32 v = vectors[i], got = irq_count_total(v);
		if (got != sent[v]) {
			fail("every interrupt sent was taken exactly once", "vector %x: sent %u, taken %u", v, sent[v], got);
			ok = false;
		}
	}
	if (ok)
		pass("every interrupt sent was taken exactly once");
}

void guest_main(void)
{
	platform_init(false);
	if (!pv_eoi_offered())
		return;
	msr_checks();
	bool on = pv_enable(0);
	check(on && pv_msr() == (pv_word_gpa(0) | KVM_MSR_ENABLED), "pv eoi enabled on cpu 0", "write ok %u, msr %lx", on,
	      pv_msr());
	skipped_eoi(V_PV, "self-ipi handler finds the bit set [isr-kept]", "skipped eoi leaves isr empty and ppr 0",
		    "same vector taken again, once per send");
	waiting_in_irr();
	level_triggered();
	ignored_bit();
	nested_ignoring();
	disabled();
	on_an_ap();
	in_x2apic_mode();
	counts();
}
