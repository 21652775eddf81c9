/* apic_base: IA32_APIC_BASE (MSR 0x1B) from inside the guest (SDM vol. 3 §11.4.3-§11.4.5, §11.12.5).
 *
 *  1. reset value: base FEE00000H, EN set, BSP set on CPU 0 only; CPUID.1:EDX[9] set. The version register
 *     as KVM builds it: six LVTs unless MCG_CAP has CMCI, directed EOI with x2APIC and an IOAPIC EOI register.
 *  2. relocation (§11.4.5): the xAPIC page moved to RELOC_BASE answers there (version, ID, a self-IPI taken
 *     and EOI'd through the new page); the old page reads all ones (nothing else claims it: irqvm answers an
 *     unclaimed MMIO read with all ones, QEMU's kvm-apic region reads all ones); moved back, the old page
 *     answers again.
 *  3. reserved bits and EXTD without EN raise #GP and leave the MSR alone (§11.4.4, §11.12.5); without
 *     x2APIC support EXTD is reserved.
 *  4. x2APIC (if CPUID.1:ECX[21]): EXTD makes the xAPIC page dead and MSR 0x802 the 32-bit ID (on each CPU);
 *     x2APIC -> xAPIC and disabled -> x2APIC raise #GP; x2APIC -> disabled -> xAPIC works.
 *  5. global disable (§11.4.3): EN = 0 clears CPUID.1:EDX[9], kills the xAPIC page and makes the APIC drop
 *     IPIs; EN = 1 again brings back the initial xAPIC ID and keeps every other register as KVM does (SVR, TPR,
 *     LDR, DFR, the LVTs; the SDM says prior initialization "may be lost"); a vector pending in IRR at the
 *     disable is taken once after it, and the dropped IPI is not delivered late. Last, because QEMU 7.2's TCG
 *     cannot re-enable.
 *
 * Tags: [tcg-apic-gap] (QEMU 7.2 TCG: the APIC page never moves, no #GP checks on IA32_APIC_BASE, a disabled
 * APIC can never be enabled again and still answers its page).
 */
#include "guest.h"

#define XAPIC_BASE 0xFEE00000ul
/* Free in irqvm's map (RAM ends at 3 GiB; the only devices above are the IOAPIC at FEC00000 and the LAPIC)
 * and in QEMU's pc machine with this command line (SeaBIOS puts the std-VGA BARs at FD000000 and FEBFxxxx,
 * HPET is at FED00000); uncached in the library's page tables (>= FE000000). */
#define RELOC_BASE 0xFEB00000ul
#define BASE_ADDR_MASK 0xFFFFFF000ul
#define V_RELOC 0x40
#define V_DISABLED 0x42
#define V_PENDING 0x44
#define GP_CAUGHT (13 + 1)
#define MSR_MCG_CAP 0x179
#define MCG_CMCI_P (1ul << 10) /* SDM vol. 3 §15.3.1.1: the CMCI LVT exists */
#define X2APIC_LVT_CMCI 0x82F

static bool has_cmci; /* MCG_CAP.MCG_CMCI_P, read by version_register() */

static u32 page_read(u64 base, u32 reg) { return *(volatile u32 *)(base + reg); }
static void page_write(u64 base, u32 reg, u32 v) { *(volatile u32 *)(base + reg) = v; }
static bool cpuid_apic_bit(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	return (d >> 9) & 1;
}
static u64 base_msr(void) { return rdmsr(APIC_BASE_MSR); }
static u64 read_cr8(void)
{
	u64 v;
	__asm__ volatile("mov %%cr8, %0" : "=r"(v));
	return v;
}
static void write_cr8(u64 v) { __asm__ volatile("mov %0, %%cr8" : : "r"(v) : "memory"); }

/* A write of IA32_APIC_BASE that must fault: #GP taken and the MSR unchanged. */
static void expect_gp(const char *name, u64 value)
{
	u64 before = base_msr();
	u32 r = wrmsr_catch(APIC_BASE_MSR, value);
	u64 after = base_msr();
	check(r == GP_CAUGHT && after == before, name, "write %lx: vector+1 %u, MSR %lx -> %lx", value, r, before,
	      after);
	if (after != before) /* accepted after all: undo it, the later checks start from `before` */
		wrmsr_catch(APIC_BASE_MSR, before);
}
/* A write of IA32_APIC_BASE that must be accepted and read back as written. */
static bool expect_ok(const char *name, u64 value)
{
	u32 r = wrmsr_catch(APIC_BASE_MSR, value);
	u64 now = base_msr();
	return check(r == 0 && now == value, name, "write %lx: vector+1 %u, reads %lx", value, r, now);
}

/* ---- 1. reset value (§11.4.4, Table 10-1) ------------------------------------------------------------------ */
static volatile u64 ap_base[MAX_CPUS];
static void read_base_on_ap(void *unused) { ap_base[this_cpu()] = base_msr(); }

static void reset_value(u64 bsp_base)
{
	check(bsp_base == (XAPIC_BASE | APIC_BASE_EN | APIC_BASE_BSP), "reset value on cpu 0 is FEE00900",
	      "IA32_APIC_BASE %lx", bsp_base);
	check(cpuid_apic_bit(), "cpuid.1 edx apic bit set at reset", "CPUID.1:EDX[9] clear");
	if (ncpus < 2) {
		skip("reset value on cpu 1 is FEE00800", "one CPU");
		return;
	}
	/* Read after the library's apic_enable, which rewrites base | EN: base and BSP are as reset left them. */
	bool ok = smp_call(1, read_base_on_ap, NULL);
	check(ok && ap_base[1] == (XAPIC_BASE | APIC_BASE_EN), "reset value on cpu 1 is FEE00800",
	      "call %d, IA32_APIC_BASE %lx", ok, ap_base[1]);
}

/* ---- 2. relocation (§11.4.5) -------------------------------------------------------------------------------- */
static volatile u32 reloc_taken;
static void reloc_handler(struct irq_frame *f, u32 cpu)
{
	reloc_taken++;
	page_write(RELOC_BASE, APIC_EOI, 0);
}

static void self_ipi_at_new_base(void)
{
	irq_set_handler(V_RELOC, reloc_handler);
	reloc_taken = 0;
	cli();
	page_write(RELOC_BASE, APIC_ICR2, 0);
	page_write(RELOC_BASE, APIC_ICR, APIC_SH_SELF | V_RELOC);
	bool pending = (page_read(RELOC_BASE, APIC_IRR + 0x10 * (V_RELOC / 32)) >> (V_RELOC % 32)) & 1;
	sti();
	bool taken = wait_eq(&reloc_taken, 1, WAIT_MS);
	u32 isr = page_read(RELOC_BASE, APIC_ISR + 0x10 * (V_RELOC / 32));
	check(taken, "self-ipi through the relocated icr is taken [tcg-apic-gap]", "taken %u, pending in IRR %d",
	      reloc_taken, pending);
	check(taken && !((isr >> (V_RELOC % 32)) & 1), "eoi at the relocated base clears isr [tcg-apic-gap]",
	      "ISR word %x", isr);
	irq_set_handler(V_RELOC, NULL);
}

static void relocation(u32 version)
{
	u64 home = base_msr();
	if (!expect_ok("relocate to FEB00000", (home & ~BASE_ADDR_MASK) | RELOC_BASE))
		return;
	u32 v_new = page_read(RELOC_BASE, APIC_VERSION), id_new = page_read(RELOC_BASE, APIC_ID);
	check(v_new == version, "version readable at the new base [tcg-apic-gap]", "reads %x, want %x", v_new,
	      version);
	check(id_new == 0, "apic id readable at the new base [tcg-apic-gap]", "reads %x", id_new);
	/* Nothing answers at FEE00000 now: irqvm's unclaimed-MMIO read and QEMU's kvm-apic region both give
	 * all ones. QEMU 7.2 TCG keeps its APIC region at FEE00000 whatever the MSR says. */
	u32 v_old = page_read(XAPIC_BASE, APIC_VERSION);
	check(v_old == 0xFFFFFFFF, "old base reads all ones after relocation [tcg-apic-gap]", "version reads %x",
	      v_old);
	self_ipi_at_new_base();
	expect_ok("relocate back to FEE00000", home);
	u32 v_back = page_read(XAPIC_BASE, APIC_VERSION), v_left = page_read(RELOC_BASE, APIC_VERSION);
	check(v_back == version, "version readable at FEE00000 again", "reads %x, want %x", v_back, version);
	check(v_left != version, "FEB00000 no longer answers after moving back", "version reads %x", v_left);
}

/* ---- 3. reserved bits, EXTD without EN (§11.4.4, §11.12.5) -------------------------------------------------- */
static void illegal_writes(void)
{
	u64 home = base_msr();
	expect_gp("reserved bit 9 raises gp [tcg-apic-gap]", home | (1ul << 9));
	expect_gp("reserved bit 0 raises gp [tcg-apic-gap]", home | 1);
	expect_gp("bit 63 raises gp [tcg-apic-gap]", home | (1ul << 63));
	expect_gp("extd without en raises gp [tcg-apic-gap]", (home & ~(u64)APIC_BASE_EN) | APIC_BASE_EXTD);
	if (!cpu_has_x2apic())
		expect_gp("extd without x2apic support raises gp [tcg-apic-gap]", home | APIC_BASE_EXTD);
}

/* ---- 4. x2APIC transitions (§11.12.5, figure "Local x2APIC State Transitions") ------------------------------ */
static volatile u64 ap_x2_id, ap_x2_base, ap_back_base;
static void x2apic_round_trip_on_ap(void *unused)
{
	u64 home = base_msr();
	if (wrmsr_catch(APIC_BASE_MSR, home | APIC_BASE_EXTD) == 0) {
		ap_x2_base = base_msr();
		ap_x2_id = rdmsr(0x802);
	}
	apic_enable(); /* xAPIC again, through the disabled state (the library's way back) */
	ap_back_base = base_msr();
}

/* The version register as KVM's LAPIC builds it (kvm_apic_set_version): version 14H; the LVT count is six
 * (timer, thermal, performance, LINT0, LINT1, error), seven with the CMCI LVT, which exists only when
 * MCG_CAP.MCG_CMCI_P says so (SDM vol. 3 §11.4.8, §15.3.1.1); bit 24 (directed EOI) only with x2APIC in
 * CPUID and an IOAPIC that has the EOI register directed EOI needs (version 20H; KVM's own, 11H, has none). */
static void version_register(u32 version)
{
	u64 mcg_cap = 0;
	has_cmci = rdmsr_catch(MSR_MCG_CAP, &mcg_cap) == 0 && (mcg_cap & MCG_CMCI_P);
	u32 lvts = ((version >> 16) & 0xFF) + 1;
	check((version & 0xFF) == 0x14 && lvts == (has_cmci ? 7u : 6u),
	      "kvm, version 14 with six lvts or seven with mcg_cap cmci", "version %x, MCG_CAP %lx", version, mcg_cap);
	u32 io_version = ioapic_read(IOAPIC_VER) & 0xFF;
	bool directed = (version >> 24) & 1, want = cpu_has_x2apic() && io_version >= 0x20;
	check(directed == want, "kvm, directed eoi offered exactly with x2apic and an ioapic eoi register",
	      "version %x, IOAPIC version %x, x2APIC %d", version, io_version, cpu_has_x2apic());
}

static void x2apic_transitions(u32 version)
{
	if (!cpu_has_x2apic()) {
		skip("x2apic transitions", "CPUID.1:ECX[21] is clear");
		return;
	}
	u64 home = base_msr(), x2 = home | APIC_BASE_EXTD;
	u64 off = home & ~(u64)(APIC_BASE_EN | APIC_BASE_EXTD);
	cli();
	if (!expect_ok("xapic to x2apic", x2)) {
		sti();
		return;
	}
	u32 mmio = page_read(XAPIC_BASE, APIC_VERSION);
	check(mmio == 0xFFFFFFFF, "xapic page reads all ones in x2apic mode", "version reads %x", mmio);
	/* The dead page takes no write either (kvm-unit-tests' apic_disable fills it with ones): CR8 and the TPR MSR
	 * keep their value, and a CR8 write shows in the TPR MSR as TPR[7:4] (SDM §11.8.6). */
	u64 cr8_was = read_cr8();
	page_write(XAPIC_BASE, APIC_TPR, 0xFFFFFFFF);
	u64 cr8_kept = read_cr8(), tpr_kept = rdmsr(0x808);
	write_cr8(cr8_was ^ 0xF);
	u64 cr8_new = read_cr8(), tpr_new = rdmsr(0x808);
	write_cr8(cr8_was);
	check(cr8_kept == cr8_was && tpr_kept == cr8_was << 4, "xapic page write in x2apic mode leaves cr8 and the tpr alone",
	      "CR8 %lx -> %lx, TPR MSR %lx", cr8_was, cr8_kept, tpr_kept);
	check(cr8_new == (cr8_was ^ 0xF) && tpr_new == cr8_new << 4, "cr8 write reads back through the x2apic tpr msr",
	      "wrote %lx: CR8 %lx, TPR MSR %lx", cr8_was ^ 0xF, cr8_new, tpr_new);
	u64 id = rdmsr(0x802), ver = rdmsr(0x803);
	check(id == 0, "x2apic id msr gives the 32-bit id on cpu 0", "MSR 0x802 %lx", id);
	check(ver == version, "x2apic version msr matches the xapic version", "MSR 0x803 %lx, xAPIC %x", ver,
	      version);
	u64 cmci_lvt = 0;
	u32 r = rdmsr_catch(X2APIC_LVT_CMCI, &cmci_lvt);
	check(has_cmci ? r == 0 : r == GP_CAUGHT, "kvm, cmci lvt msr exists exactly with mcg_cap cmci",
	      "RDMSR 0x82F: vector+1 %u, MCG_CMCI_P %d", r, has_cmci);
	expect_gp("x2apic to xapic directly raises gp", home);
	expect_gp("x2apic extd without en raises gp", (x2 & ~(u64)APIC_BASE_EN));
	expect_ok("x2apic to disabled", off);
	check(!cpuid_apic_bit(), "cpuid.1 edx apic bit clear after x2apic to disabled", "still set");
	expect_gp("disabled to x2apic directly raises gp", x2);
	expect_ok("disabled to xapic", home);
	u32 v = page_read(XAPIC_BASE, APIC_VERSION), xid = page_read(XAPIC_BASE, APIC_ID);
	check(v == version && xid == 0, "xapic page answers again after the round trip", "version %x ID %x", v, xid);
	apic_enable(); /* SVR, TPR and LVTs as the library wants them */
	sti();
	if (ncpus < 2) {
		skip("x2apic id msr on cpu 1", "one CPU");
		return;
	}
	bool ok = smp_call(1, x2apic_round_trip_on_ap, NULL);
	check(ok && (ap_x2_base & APIC_BASE_EXTD) && ap_x2_id == 1, "x2apic id msr gives the 32-bit id on cpu 1",
	      "call %d, base %lx, MSR 0x802 %lx", ok, ap_x2_base, ap_x2_id);
	check(ap_back_base == (XAPIC_BASE | APIC_BASE_EN), "cpu 1 back in xapic mode", "base %lx", ap_back_base);
}

/* ---- 5. global disable and enable (§11.4.3) ----------------------------------------------------------------- */
/* CPU 0 cannot kick CPU 1 while its own APIC is disabled: CPU 1 is called first and waits for `ipi_go`. */
static volatile u32 ipi_go, ipi_sent;
static void ipi_to_cpu0_on_go(void *unused)
{
	if (wait_nonzero(&ipi_go, WAIT_MS))
		ipi_sent = apic_send_fixed(0, V_DISABLED) ? 1 : 2;
}

static void dirty_registers(void)
{
	apic_write(APIC_SVR, 0x100 | SPURIOUS_VECTOR);
	apic_write(APIC_TPR, 0x10);
	apic_write(APIC_DFR, 0x0FFFFFFF);
	apic_write(APIC_LDR, 0x01000000);
	apic_write(APIC_LVT_TIMER, 0x50);
	apic_write(APIC_LVT_ERROR, 0x51);
}

/* KVM keeps every register but the xAPIC ID across EN = 0 -> 1 (kvm_lapic_set_base); SDM §11.4.3 leaves it open
 * ("prior initialization to the APIC may be lost"), and irqvm's model does the same as KVM. */
static void check_registers_kept(void)
{
	struct {
		const char *name;
		u32 reg, want;
	} regs[] = {
		{ "svr", APIC_SVR, 0x100 | SPURIOUS_VECTOR },
		{ "tpr", APIC_TPR, 0x10 },
		{ "ldr", APIC_LDR, 0x01000000 },
		{ "dfr", APIC_DFR, 0x0FFFFFFF },
		{ "lvt timer", APIC_LVT_TIMER, 0x50 },
		{ "lvt error", APIC_LVT_ERROR, 0x51 },
	};
	char name[96];
	for (u32 i = 0; i < sizeof(regs) / sizeof(regs[0]); i++) {
		u32 v = apic_read(regs[i].reg);
		check(v == regs[i].want,
		      sfmt(name, sizeof(name), "kvm, %s kept across the global disable [tcg-apic-gap]", regs[i].name),
		      "reads %x, want %x", v, regs[i].want);
	}
}

static void global_disable(u32 version)
{
	u64 home = base_msr(), off = home & ~(u64)APIC_BASE_EN;
	dirty_registers();
	/* The xAPIC ID is writable (SDM §11.4.6); the write is undone by the disable and re-enable below (KVM's
	 * kvm_lapic_set_base reloads the xAPIC ID from the vCPU ID when EN is set; kvm-unit-tests' apic test
	 * "correct xapic id after reset"). ID 0x7E: no CPU of these runs has it. */
	apic_write(APIC_ID, 0x7Eu << 24);
	u32 written_id = apic_read(APIC_ID) >> 24;
	irq_reset_counts();
	bool called = ncpus >= 2 && smp_call_async(1, ipi_to_cpu0_on_go, NULL);
	/* A self-IPI held in IRR (IF clear) across the disable: KVM keeps it and delivers it after the enable. */
	cli();
	apic_icr_write(0, APIC_SH_SELF | V_PENDING);
	delay_ms(5);
	if (!expect_ok("global disable", off)) {
		ipi_go = 1;
		sti();
		return;
	}
	check(!cpuid_apic_bit(), "cpuid.1 edx apic bit clear while disabled [tcg-apic-gap]", "still set");
	u32 v = page_read(XAPIC_BASE, APIC_VERSION);
	check(v == 0xFFFFFFFF, "xapic page reads all ones while disabled [tcg-apic-gap]", "version reads %x", v);
	/* CR8 is the processor's, not the disabled page's (kvm-unit-tests' apic_disable): a write of ones to the TPR
	 * slot leaves it alone, and it takes a write and reads it back. Put back before the re-enable. */
	u64 cr8_was = read_cr8();
	page_write(XAPIC_BASE, APIC_TPR, 0xFFFFFFFF);
	u64 cr8_kept = read_cr8();
	write_cr8(cr8_was ^ 0xF);
	u64 cr8_new = read_cr8();
	write_cr8(cr8_was);
	check(cr8_kept == cr8_was && cr8_new == (cr8_was ^ 0xF),
	      "cr8 ignores the page and takes writes while the apic is disabled", "CR8 %lx, %lx after the page write, %lx after writing %lx",
	      cr8_was, cr8_kept, cr8_new, cr8_was ^ 0xF);
	if (ncpus >= 2) {
		ipi_go = 1;
		bool sent = called && wait_nonzero(&ipi_sent, WAIT_MS) && ipi_sent == 1;
		delay_ms(50);
		check(sent && irq_count[0][V_DISABLED] == 0, "disabled apic drops an ipi [tcg-apic-gap]",
		      "call %d, sent %u, taken %u", called, ipi_sent, irq_count[0][V_DISABLED]);
	} else {
		skip("disabled apic drops an ipi", "one CPU");
	}
	u32 r = wrmsr_catch(APIC_BASE_MSR, home);
	u64 now = base_msr();
	if (!check(r == 0 && now == home, "global re-enable [tcg-apic-gap]", "vector+1 %u, reads %lx", r, now)) {
		sti();
		return;
	}
	check(cpuid_apic_bit(), "cpuid.1 edx apic bit set after re-enable [tcg-apic-gap]", "still clear");
	v = page_read(XAPIC_BASE, APIC_VERSION);
	u32 id = page_read(XAPIC_BASE, APIC_ID);
	check(v == version && id == 0, "xapic page answers after re-enable", "version %x ID %x", v, id);
	check(written_id == 0x7E && id == 0, "xapic id written before the disable is the initial id after re-enable",
	      "ID %x after the write, %x after re-enable", written_id, id >> 24);
	check_registers_kept();
	bool irr = apic_vector_bit(APIC_IRR, V_DISABLED), pending = apic_vector_bit(APIC_IRR, V_PENDING);
	apic_enable();
	sti();
	delay_ms(20);
	check(pending && irq_count[0][V_PENDING] == 1,
	      "kvm, a vector pending at the global disable is taken once after re-enable [tcg-apic-gap]",
	      "IRR %d at the re-enable, taken %u", pending, irq_count[0][V_PENDING]);
	check(!irr && irq_count[0][V_DISABLED] == 0, "ipi dropped while disabled is not delivered after re-enable [tcg-apic-gap]",
	      "IRR %d, taken %u", irr, irq_count[0][V_DISABLED]);
}

void guest_main(void)
{
	u64 bsp_base = base_msr(); /* before platform_init's apic_enable rewrites it */
	platform_init(false);
	u32 started = smp_start_all();
	check(started == ncpus, "all cpus online", "%u of %u", started, ncpus);
	u32 version = apic_read(APIC_VERSION);
	printf("INFO: %u CPU(s), APIC version %x, x2APIC %s\n", ncpus, version, cpu_has_x2apic() ? "yes" : "no");
	reset_value(bsp_base);
	version_register(version);
	relocation(version);
	illegal_writes();
	x2apic_transitions(version);
	global_disable(version);
}
