/* lapic_regs: a fixed table of local APIC register probes (SDM vol. 3 ch. 11), run on CPU 0 with interrupts
 * off, first in xAPIC mode and then, when CPUID offers it, in x2APIC mode. With `dump=1` on the command line
 * every probe prints one `P:` line with what it saw, so that two runs (irqvm's `user` mode against KVM's
 * in-kernel LAPIC in `kernel` mode) can be compared line by line; the checks assert the expected results.
 *
 * Nothing here depends on timing: the timer's current count is only reported as 0 or "nonzero, at most the
 * initial count". Every probe puts back what it changed, and no probe sends INIT, SIPI, SMI or NMI to this CPU
 * (ICR probes that could reach it use fixed delivery; the others go to absent destinations).
 */
#include "guest.h"

#define XAPIC 0xFEE00000ul
#define GP (13 + 1)
#define V_SELF 0x41   /* a self-IPI the probes take again with interrupts on */
#define V_HELD 0x50   /* an in-service vector whose EOI the probes hold back */
#define V_PEND 0x60   /* a vector kept pending in IRR */

static bool dump;

#define P(...)                          \
	do {                            \
		if (dump)               \
			printf(__VA_ARGS__); \
	} while (0)

/* A group of probes reported as one check: the first probe that went wrong is the detail. */
struct grp {
	bool bad;
	char detail[120];
};
#define GF(g, ...)                                                        \
	do {                                                              \
		if (!(g)->bad) {                                          \
			(g)->bad = true;                                  \
			sfmt((g)->detail, sizeof (g)->detail, __VA_ARGS__); \
		}                                                         \
	} while (0)
static void report(struct grp *g, const char *name)
{
	char full[120];
	sfmt(full, sizeof full, name, apic_x2 ? "x2apic" : "xapic");
	check(!g->bad, full, "%s", g->bad ? g->detail : "");
	memset(g, 0, sizeof *g);
}
/* Groups shared by the probes of one mode (reported and cleared at the end of each). */
static struct grp g_rsvd_zero, g_rsvd_esr, g_defined_esr, g_ro, g_mask, g_lvt_ro, g_sub, g_subw;
static struct grp g_x2_readable, g_x2_ro_gp, g_x2_high_gp, g_x2_rsvd_gp, g_x2_self_gp, g_x2_self_illegal;

/* The CMCI LVT (0x2F0, MSR 0x82F) and the version register are left out of every check: whether the APIC
 * has a CMCI slot and offers directed EOI (SVR bit 12) is a configuration choice, not a register rule. */
#define CMCI 0x2F0

/* ---- xAPIC page accesses ---------------------------------------------------------------------------------- */
static u32 mr(u32 off) { return *(volatile u32 *)(XAPIC + off); }
static void mw(u32 off, u32 v) { *(volatile u32 *)(XAPIC + off) = v; }
static u32 mr8(u32 off) { return *(volatile u8 *)(XAPIC + off); }
static u32 mr16(u32 off) { return *(volatile u16 *)(XAPIC + off); }
static void mw8(u32 off, u8 v) { *(volatile u8 *)(XAPIC + off) = v; }
static void mw16(u32 off, u16 v) { *(volatile u16 *)(XAPIC + off) = v; }

/* ESR as software reads it (SDM §11.5.3): write (latching the errors seen since the last write), then read.
 * In x2APIC mode the write must be 0. */
static u32 esr(void)
{
	apic_write(APIC_ESR, 0);
	return apic_read(APIC_ESR);
}

/* ---- what the SDM calls reserved in each register (§11.4.1 table, §11.5.1 figure, §11.6.1, §11.9) --------- */
static bool is_lvt(u32 off) { return (off >= 0x320 && off <= 0x370) || off == 0x2F0; }
static u32 sdm_reserved(u32 off)
{
	switch (off) {
	case APIC_ID: return 0x00FFFFFF;
	case APIC_TPR: return 0xFFFFFF00;
	case APIC_LDR: return 0x00FFFFFF;
	case APIC_DFR: return 0x0FFFFFFF;
	case APIC_SVR: return 0xFFFFEC00;
	case APIC_ICR2: return 0x00FFFFFF;
	case APIC_LVT_TIMER: return 0xFFF8EF00;
	case 0x2F0: case APIC_LVT_THERMAL: case APIC_LVT_PERF: return 0xFFFEE800;
	case APIC_LVT_LINT0: case APIC_LVT_LINT1: return 0xFFFE0800;
	case APIC_LVT_ERROR: return 0xFFFEEF00;
	case APIC_TDCR: return 0xFFFFFFF4;
	case APIC_SELF_IPI: return 0xFFFFFF00;
	default: return 0xFFFFFFFF;
	}
}

/* The bits a write may change (SDM §11.4.1 table, §11.5.1 figure: LVT delivery status and remote IRR are
 * read-only; SVR bit 12 is left out, see CMCI above; 0 for registers without writable bits). */
static u32 sdm_writable(u32 off)
{
	switch (off) {
	case APIC_ID: return apic_x2 ? 0 : 0xFF000000;
	case APIC_TPR: return 0xFF;
	case APIC_LDR: return apic_x2 ? 0 : 0xFF000000;
	case APIC_DFR: return apic_x2 ? 0 : 0xF0000000;
	case APIC_SVR: return 0x3FF;
	case APIC_ICR2: return apic_x2 ? 0 : 0xFF000000;
	case APIC_LVT_TIMER: return 0x700FF;
	case APIC_LVT_THERMAL: case APIC_LVT_PERF: return 0x107FF;
	case APIC_LVT_LINT0: case APIC_LVT_LINT1: return 0x1A7FF;
	case APIC_LVT_ERROR: return 0x100FF;
	case APIC_TMICT: return 0xFFFFFFFF;
	case APIC_TDCR: return 0xB;
	default: return 0;
	}
}

/* xAPIC offsets the SDM's table defines (0x3F0 is x2APIC only; EOI is write-only and RRD is not decoded by
 * KVM, so both are with the reserved offsets in the read-zero check). */
static bool xapic_defined(u32 off)
{
	return off == APIC_ID || off == APIC_VERSION || off == APIC_TPR || off == APIC_APR || off == APIC_PPR ||
	       off == APIC_EOI || off == 0x0C0 || off == APIC_LDR || off == APIC_DFR || off == APIC_SVR ||
	       (off >= 0x100 && off <= 0x280) || (off >= 0x300 && off <= 0x390) || off == APIC_TDCR || off == CMCI;
}
static bool xapic_read_only(u32 off)
{
	return off == APIC_VERSION || off == APIC_APR || off == APIC_PPR || (off >= 0x100 && off <= 0x270) ||
	       off == APIC_TMCCT;
}

/* Registers the write table leaves alone: ICR (own probes), and the x2APIC self-IPI (own probes). */
static bool write_skipped(u32 off) { return off == APIC_ICR || (apic_x2 && off == APIC_SELF_IPI); }

static const u32 patterns[] = { 0, 0xFFFFFFFF, 0x55555555, 0xAAAAAAAA };
#define NPAT 6 /* the four above, the register's reserved bits alone and its writable bits alone */
static u32 pattern(u32 off, u32 i) { return i < 4 ? patterns[i] : i == 4 ? sdm_reserved(off) : sdm_writable(off); }

/* Takes every pending interrupt (a self-IPI left in IRR) with interrupts on for a moment. */
static void drain(void)
{
	u64 end = rdtsc() + ms_to_tsc(20);
	sti();
	while (rdtsc() < end) {
		bool any = false;
		for (u32 i = 1; i < 8; i++)
			any |= apic_read(APIC_IRR + 0x10 * i) != 0;
		if (!any)
			break;
		cpu_relax();
	}
	cli();
}

static void restore_lvts(void)
{
	static const u32 lvts[] = { APIC_LVT_TIMER, APIC_LVT_THERMAL, APIC_LVT_PERF, APIC_LVT_LINT0, APIC_LVT_LINT1,
				    APIC_LVT_ERROR };
	for (u32 i = 0; i < sizeof lvts / sizeof lvts[0]; i++)
		apic_write(lvts[i], APIC_LVT_MASKED);
	apic_write(APIC_TMICT, 0);
}

/* ---- xAPIC ------------------------------------------------------------------------------------------------ */
static void xapic_write_checks(u32 off, u32 w, u32 orig, u32 back, u32 e)
{
	if (off == CMCI)
		return;
	if (xapic_defined(off) && e != 0)
		GF(&g_defined_esr, "write %x to %03x: ESR %x", w, off, e);
	if (!xapic_defined(off) && e != 0x80)
		GF(&g_rsvd_esr, "write to %03x: ESR %x", off, e);
	if (xapic_read_only(off) && back != (off == APIC_TMCCT ? 0 : orig))
		GF(&g_ro, "write %x to read-only %03x: reads %x, was %x", w, off, back, orig);
	u32 expect = w & sdm_writable(off);
	if (off == APIC_DFR)
		expect |= 0x0FFFFFFF;
	if (is_lvt(off)) {
		if (back & 0x5000)
			GF(&g_lvt_ro, "write %x to %03x reads %x", w, off, back);
		back &= ~0x5000u;
	}
	if (off == APIC_SVR)
		back &= ~0x1000u;
	if (sdm_writable(off) && back != expect)
		GF(&g_mask, "write %x to %03x reads %x, expected %x", w, off, back, expect);
}

static void xapic_table(void)
{
	esr();
	for (u32 off = 0; off <= 0x3F0; off += 0x10) {
		u32 v = mr(off);
		u32 e = esr();
		if (off == APIC_TMCCT)
			v = v != 0;
		P("P: x rd %03x = %08x esr %x\n", off, v, e);
		if (off == CMCI)
			continue;
		bool defined = xapic_defined(off) && off != APIC_EOI && off != 0x0C0;
		if (!defined && v != 0)
			GF(&g_rsvd_zero, "read of %03x gave %x", off, v);
		if (!xapic_defined(off) && e != 0x80)
			GF(&g_rsvd_esr, "read of %03x: ESR %x", off, e);
		if (xapic_defined(off) && e != 0)
			GF(&g_defined_esr, "read of %03x: ESR %x", off, e);
	}
	for (u32 off = 0; off <= 0x3F0; off += 0x10) {
		if (write_skipped(off))
			continue;
		u32 orig = mr(off);
		esr();
		for (u32 i = 0; i < NPAT; i++) {
			u32 w = pattern(off, i);
			mw(off, w);
			u32 back = mr(off);
			if (off == APIC_TMCCT)
				back = back != 0;
			if (off == APIC_SVR || off == APIC_ID || off == APIC_LDR || off == APIC_DFR || off == APIC_TDCR ||
			    off == APIC_TMICT || off == APIC_ICR2 || off == APIC_TPR || is_lvt(off))
				mw(off, orig);
			if (off == APIC_SVR)
				restore_lvts();
			u32 e = esr();
			P("P: x wr %03x %08x -> %08x esr %x\n", off, w, back, e);
			xapic_write_checks(off, w, orig, back, e);
		}
	}
	/* Byte, word and unaligned reads, and the other bytes of a slot. */
	static const u32 subs[] = { APIC_ID, APIC_VERSION, APIC_TPR, APIC_DFR, APIC_SVR, APIC_LVT_LINT0, 0x040 };
	mw(APIC_TPR, 0x5A);
	mw(APIC_LVT_LINT0, 0x1A7F5);
	esr();
	for (u32 i = 0; i < sizeof subs / sizeof subs[0]; i++) {
		u32 off = subs[i], full = mr(off);
		bool defined = xapic_defined(off);
		esr();
		for (u32 b = 0; b < 4; b++) {
			u32 v = mr8(off + b), e = esr();
			P("P: x rd8 %03x+%x = %x esr %x\n", off, b, v, e);
			if (defined && (v != ((full >> (8 * b)) & 0xFF) || e != 0))
				GF(&g_sub, "byte %u of %03x (%x) reads %x, ESR %x", b, off, full, v, e);
		}
		for (u32 b = 0; b < 3; b++) {
			u32 v = mr16(off + b), e = esr();
			P("P: x rd16 %03x+%x = %x esr %x\n", off, b, v, e);
			if (defined && (v != ((full >> (8 * b)) & 0xFFFF) || e != 0))
				GF(&g_sub, "word at byte %u of %03x (%x) reads %x, ESR %x", b, off, full, v, e);
		}
		static const u32 at32[] = { 1, 2, 3, 4, 8, 12 };
		for (u32 b = 0; b < 6; b++) {
			u32 v = mr(off + at32[b]), e = esr();
			P("P: x rd32 %03x+%x = %x esr %x\n", off, at32[b], v, e);
			if (v != 0)
				GF(&g_rsvd_zero, "dword at %03x+%x reads %x", off, at32[b], v);
		}
		u32 v = mr8(off + 5), e = esr();
		P("P: x rd8 %03x+5 = %x esr %x\n", off, v, e);
		if (v != 0)
			GF(&g_rsvd_zero, "byte at %03x+5 reads %x", off, v);
	}
	/* Byte, word and unaligned writes to TPR (0x5A). */
	u32 t, e;
	esr();
	mw8(APIC_TPR, 0x30);
	t = mr(APIC_TPR);
	e = esr();
	P("P: x wr8 080 30 -> %08x esr %x\n", t, e);
	if (t != 0x5A)
		GF(&g_subw, "byte write 30 to TPR: reads %x", t);
	mw16(APIC_TPR, 0x3131);
	t = mr(APIC_TPR);
	e = esr();
	P("P: x wr16 080 3131 -> %08x esr %x\n", t, e);
	if (t != 0x5A)
		GF(&g_subw, "word write 3131 to TPR: reads %x", t);
	mw8(APIC_TPR + 1, 0x32);
	t = mr(APIC_TPR);
	e = esr();
	P("P: x wr8 081 32 -> %08x esr %x\n", t, e);
	if (t != 0x5A)
		GF(&g_subw, "byte write 32 to TPR+1: reads %x", t);
	mw(APIC_TPR + 4, 0x33);
	t = mr(APIC_TPR);
	e = esr();
	P("P: x wr32 084 33 -> %08x esr %x\n", t, e);
	if (t != 0x5A)
		GF(&g_subw, "dword write 33 to TPR+4: reads %x", t);
	mw(APIC_TPR, 0);
	mw(APIC_LVT_LINT0, APIC_LVT_MASKED);
	report(&g_rsvd_zero, "reserved and write-only offsets and reads past a register read 0 [kvm-mmio-stale]");
	report(&g_rsvd_esr, "reserved offsets set esr bit 7 (illegal register address) [kvm-no-esr-illegal-reg]");
	report(&g_defined_esr, "kvm, accesses to defined registers set no esr bit in %s mode");
	report(&g_ro, "kvm, writes to read-only registers change nothing in %s mode");
	report(&g_mask, "kvm, a write keeps each register's writable bits in %s mode");
	report(&g_lvt_ro, "lvt delivery status and remote irr are read-only in %s mode [kvm-lvt-status-writable]");
	report(&g_sub, "kvm, byte and word reads return the register's bytes");
	report(&g_subw, "kvm, byte, word and unaligned writes are ignored");
}

/* ---- x2APIC ----------------------------------------------------------------------------------------------- */
static bool x2_readable(u32 msr)
{
	u32 off = (msr - 0x800) << 4;
	return off == APIC_ID || off == APIC_VERSION || off == APIC_TPR || off == APIC_PPR || off == APIC_LDR ||
	       off == APIC_SVR || (off >= 0x100 && off <= 0x280) || off == APIC_ICR ||
	       (off >= 0x320 && off <= 0x390) || off == APIC_TDCR;
}
static bool x2_writable(u32 msr)
{
	u32 off = (msr - 0x800) << 4;
	return off == APIC_TPR || off == APIC_EOI || off == APIC_SVR || off == APIC_ESR || off == APIC_ICR ||
	       (off >= 0x320 && off <= 0x380) || off == APIC_TDCR || off == APIC_SELF_IPI;
}

static void x2apic_table(void)
{
	u64 v, b;
	esr();
	for (u32 msr = 0x800; msr <= 0x8FF; msr++) {
		u32 r = rdmsr_catch(msr, &v);
		if (msr == 0x839)
			v = v != 0;
		u32 e = esr();
		P("P: m rd %03x = %lx gp %u esr %x\n", msr, v, r == GP, e);
		if (msr != 0x800 + (CMCI >> 4) && (r == GP) == x2_readable(msr))
			GF(&g_x2_readable, "RDMSR %x: %s", msr, r == GP ? "#GP" : "no #GP");
	}
	for (u32 msr = 0x800; msr <= 0x8FF; msr++) {
		u32 off = (msr - 0x800) << 4;
		if (write_skipped(off))
			continue;
		u64 orig;
		bool readable = rdmsr_catch(msr, &orig) == 0;
		for (u32 i = 0; i < NPAT + 2; i++) {
			u64 w = i < NPAT ? pattern(off, i) : i == NPAT ? (1ul << 32) | orig : 0xFFFFFFFF00000000ul;
			u32 r = wrmsr_catch(msr, w);
			u32 rb = rdmsr_catch(msr, &b);
			if (msr == 0x839)
				b = b != 0;
			if (readable && r == 0 && msr != 0x839)
				wrmsr_catch(msr, orig);
			if (off == APIC_SVR)
				restore_lvts();
			u32 e = esr();
			P("P: m wr %03x %lx gp %u -> %lx gp %u esr %x\n", msr, w, r == GP, b, rb == GP, e);
			if (off == CMCI)
				continue;
			bool gp = r == GP;
			if (!x2_writable(msr) && !gp)
				GF(&g_x2_ro_gp, "WRMSR %x, %lx: no #GP", msr, w);
			if (w >> 32 && !gp)
				GF(&g_x2_high_gp, "WRMSR %x, %lx: no #GP", msr, w);
			if (!x2_writable(msr) || w >> 32)
				continue;
			/* EOI and ESR take 0 only (SDM §11.12.1.2 table); the others their writable bits. */
			u32 allowed = off == APIC_EOI || off == APIC_ESR ? 0 : sdm_writable(off);
			if (off == APIC_SVR)
				allowed |= 0x1000;
			if (is_lvt(off))
				allowed |= 0x1000;
			bool rsvd = (w & ~(u64)allowed) != 0;
			if (rsvd && !gp)
				GF(&g_x2_rsvd_gp, "WRMSR %x, %lx: no #GP", msr, w);
			if (!rsvd && gp && (off != APIC_LVT_TIMER || (w & 0x60000) != 0x60000))
				GF(&g_defined_esr, "WRMSR %x, %lx: #GP", msr, w);
			if (!rsvd && !gp && off != APIC_EOI && off != APIC_ESR) {
				u64 got = b;
				if (is_lvt(off))
					got &= ~0x5000ul;
				if (off == APIC_SVR)
					got &= ~0x1000ul;
				if (got != (w & sdm_writable(off)))
					GF(&g_mask, "WRMSR %x, %lx reads %lx", msr, w, b);
			}
			if (e != 0)
				GF(&g_defined_esr, "WRMSR %x, %lx: ESR %x", msr, w, e);
		}
	}
	/* Self-IPI: only the vector is defined. */
	static const u64 selfs[] = { V_SELF, 0xFFFFFF00ul | V_SELF, (1ul << 32) | V_SELF, 0x05 };
	for (u32 i = 0; i < 4; i++) {
		irq_reset_counts();
		u32 r = wrmsr_catch(0x83F, selfs[i]);
		u32 pending = apic_vector_bit(APIC_IRR, selfs[i] & 0xFF);
		u32 e = esr();
		drain();
		u32 taken = irq_count[0][selfs[i] & 0xFF];
		P("P: m self %lx gp %u irr %u esr %x taken %u\n", selfs[i], r == GP, pending, e, taken);
		if (i == 0 && (r != 0 || !pending || taken != 1 || e != 0))
			GF(&g_x2_self_gp, "self-IPI %lx: #GP %u, IRR %u, ESR %x, taken %u", selfs[i], r == GP, pending, e,
			   taken);
		if ((i == 1 || i == 2) && (r != GP || pending || taken))
			GF(&g_x2_self_gp, "self-IPI %lx: #GP %u, IRR %u, taken %u", selfs[i], r == GP, pending, taken);
		if (i == 3 && (r != 0 || pending || e != 0x40))
			GF(&g_x2_self_illegal, "self-IPI 5: #GP %u, IRR %u, ESR %x", r == GP, pending, e);
	}
	report(&g_x2_readable, "kvm, x2apic msrs that rdmsr reads are the sdm table's");
	report(&g_x2_ro_gp, "kvm, wrmsr to read-only, absent and reserved x2apic msrs raises gp");
	report(&g_x2_high_gp, "kvm, wrmsr with bits 63-32 set raises gp outside the icr");
	report(&g_x2_rsvd_gp, "wrmsr setting a reserved bit of an x2apic register raises gp [kvm-x2apic-lax-rsvd]");
	report(&g_defined_esr, "kvm, accesses to defined registers set no esr bit in %s mode");
	report(&g_mask, "kvm, a write keeps each register's writable bits in %s mode");
	report(&g_x2_self_gp, "kvm, the self ipi msr sends its vector and refuses other bits with gp");
	report(&g_x2_self_illegal, "self ipi with a vector below 16 sets esr bit 6 and is dropped [kvm-no-esr-illegal-vector]");
}

/* ---- SVR software disable ----------------------------------------------------------------------------------- */
static void svr_probe(void)
{
	static const u32 lvts[] = { APIC_LVT_TIMER, APIC_LVT_THERMAL, APIC_LVT_PERF, APIC_LVT_LINT0, APIC_LVT_LINT1,
				    APIC_LVT_ERROR };
	for (u32 i = 0; i < 6; i++)
		apic_write(lvts[i], 0x70 + i);
	struct grp g = { 0 };
	apic_write(APIC_SVR, 0xFF);
	for (u32 i = 0; i < 6; i++) {
		u32 v = apic_read(lvts[i]);
		P("P: %c svr off lvt %03x = %x\n", apic_x2 ? 'm' : 'x', lvts[i], v);
		if (v != (0x10070 + i))
			GF(&g, "after the disable LVT %03x reads %x", lvts[i], v);
	}
	apic_write(APIC_LVT_TIMER, 0x71);
	apic_write(APIC_LVT_LINT0, 0x700);
	u32 t = apic_read(APIC_LVT_TIMER), l0 = apic_read(APIC_LVT_LINT0);
	P("P: %c svr off write lvt 320 71 -> %x, 350 700 -> %x\n", apic_x2 ? 'm' : 'x', t, l0);
	if (t != 0x10071 || l0 != 0x10700)
		GF(&g, "writes while disabled: LVT timer %x, LINT0 %x", t, l0);
	apic_write(APIC_SVR, 0x1FF);
	for (u32 i = 0; i < 6; i++) {
		u32 v = apic_read(lvts[i]);
		P("P: %c svr on lvt %03x = %x\n", apic_x2 ? 'm' : 'x', lvts[i], v);
		if (!(v & APIC_LVT_MASKED))
			GF(&g, "after the enable LVT %03x reads %x", lvts[i], v);
	}
	report(&g, "software disable masks every lvt until written again in %s mode");
	/* A self-IPI while software-disabled (SDM §11.4.7.2: interrupts are not accepted... ) */
	apic_write(APIC_SVR, 0xFF);
	apic_icr_write(0, APIC_SH_SELF | V_SELF);
	u32 pend = apic_vector_bit(APIC_IRR, V_SELF);
	u32 e = esr();
	apic_write(APIC_SVR, 0x1FF);
	irq_reset_counts();
	drain();
	P("P: %c svr off self-ipi irr %u esr %x taken %u\n", apic_x2 ? 'm' : 'x', pend, e, irq_count[0][V_SELF]);
	if (pend || irq_count[0][V_SELF])
		GF(&g, "self-IPI while disabled: IRR %u, taken %u", pend, irq_count[0][V_SELF]);
	report(&g, "a software-disabled apic accepts no fixed interrupt in %s mode");
	restore_lvts();
}

/* ---- LDR / DFR ------------------------------------------------------------------------------------------------ */
static void ldr_probe(void)
{
	if (!apic_x2) {
		static const u32 dfrs[] = { 0, 0x12345678, 0xF0000000, 0x7FFFFFFF, 0xFFFFFFFF };
		struct grp g = { 0 };
		for (u32 i = 0; i < 5; i++) {
			mw(APIC_DFR, dfrs[i]);
			u32 d = mr(APIC_DFR), e = esr();
			P("P: x dfr %08x -> %08x esr %x\n", dfrs[i], d, e);
			if (d != ((dfrs[i] & 0xF0000000) | 0x0FFFFFFF))
				GF(&g, "DFR write %x reads %x", dfrs[i], d);
		}
		report(&g, "kvm, dfr keeps bits 31-28 as written and reads ones below");
		mw(APIC_LDR, 0xA5000000);
		P("P: x ldr a5000000 -> %08x\n", mr(APIC_LDR));
		/* Back to LDR 0: the ICR probes' logical destination must match nothing. */
		mw(APIC_LDR, 0);
	} else {
		u64 v;
		u32 r = rdmsr_catch(0x80D, &v);
		u32 id = apic_read(APIC_ID);
		P("P: m ldr = %lx gp %u id %x\n", v, r == GP, id);
		check(r == 0 && v == (((id >> 4) << 16) | (1u << (id & 15))), "x2apic ldr is derived from the x2apic id",
		      "LDR %lx (#GP %u), ID %x", v, r == GP, id);
	}
}

/* ---- ICR ---------------------------------------------------------------------------------------------------- */
static void icr_probe(void)
{
	char c = apic_x2 ? 'm' : 'x';
	struct grp g_back = { 0 }, g_esr = { 0 }, g_illegal = { 0 }, g_rsvd = { 0 }, g_self = { 0 };
	esr();
	for (u32 dm = 0; dm < 8; dm++)
		for (u32 lg = 0; lg < 2; lg++)
			for (u32 lvl = 0; lvl < 2; lvl++)
				for (u32 trig = 0; trig < 2; trig++)
					for (u32 sh = 0; sh < 2; sh++) {
						u32 lo = 0x31 | dm << 8 | lg << 11 | lvl << 14 | trig << 15 | sh * (3u << 18);
						u32 dest = lg ? (apic_x2 ? 0xFFFF0000u : 0x80u) : 0x55u;
						if (apic_x2) {
							u32 r = wrmsr_catch(0x830, (u64)dest << 32 | lo);
							u64 back;
							rdmsr_catch(0x830, &back);
							u32 e = esr();
							P("P: m icr %08x %x gp %u -> %lx esr %x\n", lo, dest, r == GP, back, e);
							if (r != 0 || back != ((u64)dest << 32 | lo))
								GF(&g_back, "ICR %x dest %x: #GP %u, reads %lx", lo, dest,
								   r == GP, back);
							if (e != 0)
								GF(&g_esr, "ICR %x dest %x: ESR %x", lo, dest, e);
						} else {
							mw(APIC_ICR2, dest << 24);
							mw(APIC_ICR, lo);
							u32 back = mr(APIC_ICR), hi = mr(APIC_ICR2), e = esr();
							P("P: x icr %08x %x -> %08x %08x esr %x\n", lo, dest, back, hi, e);
							if (back != lo || hi != dest << 24)
								GF(&g_back, "ICR %x dest %x reads %x %x", lo, dest, back, hi);
							if (e != 0)
								GF(&g_esr, "ICR %x dest %x: ESR %x", lo, dest, e);
						}
					}
	/* Illegal vectors, reserved bits, fixed to self. */
	static const u32 odd[] = { 0x05, 0x405, 0x105, 0x000C0005, 0x2031, 0x30031, 0xFFF00031, 0x1031 };
	for (u32 i = 0; i < sizeof odd / sizeof odd[0]; i++) {
		/* Fixed and lowest priority with vector 5 are illegal (ESR bit 5, SDM §11.5.3); NMI has no vector.
		 * Bits 13, 17:16 and 31:20 are reserved: #GP in x2APIC mode (§11.12.9), stored in xAPIC mode
		 * (KVM). Bit 12, delivery status, is read-only and reads 0. */
		bool illegal = odd[i] != 0x405 && (odd[i] & 0xFF) == 5;
		bool rsvd = (odd[i] & 0xFFF32000) != 0;
		u32 e;
		if (apic_x2) {
			u64 old;
			rdmsr_catch(0x830, &old);
			u32 r = wrmsr_catch(0x830, (u64)0x55 << 32 | odd[i]);
			u64 back;
			rdmsr_catch(0x830, &back);
			e = esr();
			P("P: m icr %08x 55 gp %u -> %lx esr %x\n", odd[i], r == GP, back, e);
			if (rsvd && (r != GP || back != old))
				GF(&g_rsvd, "ICR %x: #GP %u, reads %lx", odd[i], r == GP, back);
			if (!rsvd && (r != 0 || back != ((u64)0x55 << 32 | (odd[i] & ~0x1000u))))
				GF(&g_back, "ICR %x: #GP %u, reads %lx", odd[i], r == GP, back);
		} else {
			mw(APIC_ICR2, 0x55u << 24);
			mw(APIC_ICR, odd[i]);
			u32 back = mr(APIC_ICR);
			e = esr();
			P("P: x icr %08x 55 -> %08x esr %x\n", odd[i], back, e);
			if (back != (odd[i] & ~0x1000u))
				GF(&g_back, "ICR %x reads %x", odd[i], back);
		}
		if (illegal && e != 0x20)
			GF(&g_illegal, "ICR %x: ESR %x", odd[i], e);
		if (!illegal && e != 0)
			GF(&g_esr, "ICR %x: ESR %x", odd[i], e);
	}
	if (apic_x2) {
		u32 r = wrmsr_catch(0x830, 0x1234500000000ul | APIC_SH_SELF | V_SELF);
		u64 back;
		rdmsr_catch(0x830, &back);
		bool pend = apic_vector_bit(APIC_IRR, V_SELF);
		P("P: m icr self gp %u -> %lx irr %u\n", r == GP, back, pend);
		if (r != 0 || back != (0x1234500000000ul | APIC_SH_SELF | V_SELF) || !pend)
			GF(&g_self, "#GP %u, reads %lx, IRR %u", r == GP, back, pend);
	} else {
		mw(APIC_ICR2, 0x12000000);
		mw(APIC_ICR, APIC_SH_SELF | V_SELF);
		u32 back = mr(APIC_ICR);
		bool pend = apic_vector_bit(APIC_IRR, V_SELF);
		P("P: x icr self -> %08x irr %u\n", back, pend);
		if (back != (APIC_SH_SELF | V_SELF) || !pend)
			GF(&g_self, "reads %x, IRR %u", back, pend);
	}
	irq_reset_counts();
	drain();
	u32 e = esr();
	P("P: %c icr self taken %u esr %x\n", c, irq_count[0][V_SELF], e);
	if (irq_count[0][V_SELF] != 1 || e != 0)
		GF(&g_self, "taken %u times, ESR %x", irq_count[0][V_SELF], e);
	report(&g_back, "kvm, the icr reads back every bit written but delivery status in %s mode");
	report(&g_esr, "kvm, ipis to absent destinations set no esr bit in %s mode");
	report(&g_illegal, "an ipi with a vector below 16 sets esr bit 5 in %s mode [kvm-no-esr-illegal-vector]");
	report(&g_self, "a fixed self ipi is pending with interrupts off and taken once in %s mode");
	if (apic_x2)
		report(&g_rsvd, "kvm, an x2apic icr write with a reserved bit raises gp and changes nothing");
}

/* ---- TPR / PPR / APR ------------------------------------------------------------------------------------------ */
static void held_handler(struct irq_frame *f, u32 cpu) { /* no EOI: the vector stays in service */ }

static struct grp g_ppr_idle, g_ppr_isr, g_apr;

/* One state: TPR, PPR and APR read, with the PPR and APR the SDM gives for it (§11.8.3.1, §11.6.2.4; 0xFFFF:
 * not checked). The PPR of a state with a vector in service needs the ISR bit kept until the EOI. */
static void prio_line(const char *what, u32 ppr_want, u32 apr_want, bool in_service)
{
	u32 apr = apic_x2 ? 0 : apic_read(APIC_APR), ppr = apic_read(APIC_PPR);
	P("P: %c prio %s: tpr %x ppr %x apr %x isr50 %u irr60 %u\n", apic_x2 ? 'm' : 'x', what, apic_read(APIC_TPR),
	  ppr, apr, apic_vector_bit(APIC_ISR, V_HELD), apic_vector_bit(APIC_IRR, V_PEND));
	if (ppr != ppr_want)
		GF(in_service ? &g_ppr_isr : &g_ppr_idle, "%s: PPR %x, expected %x", what, ppr, ppr_want);
	if (!apic_x2 && apr_want != 0xFFFF && apr != apr_want)
		GF(&g_apr, "%s: APR %x, expected %x", what, apr, apr_want);
}

static void prio_probe(void)
{
	static const u32 tprs[] = { 0, 0x10, 0x5A, 0xFF };
	for (u32 i = 0; i < 4; i++) {
		apic_write(APIC_TPR, tprs[i]);
		char w[24];
		prio_line(sfmt(w, sizeof w, "idle tpr %x", tprs[i]), tprs[i], tprs[i] & 0xF0 ? tprs[i] : 0, false);
	}
	apic_write(APIC_TPR, 0);
	irq_set_handler(V_HELD, held_handler);
	irq_reset_counts();
	apic_icr_write(0, APIC_SH_SELF | V_HELD);
	u64 end = rdtsc() + ms_to_tsc(20);
	sti();
	while (!irq_count[0][V_HELD] && rdtsc() < end)
		cpu_relax();
	cli();
	prio_line("isr 50 tpr 0", 0x50, 0xFFFF, true);
	apic_write(APIC_TPR, 0x3F);
	prio_line("isr 50 tpr 3f", 0x50, 0xFFFF, true);
	apic_write(APIC_TPR, 0x5A);
	prio_line("isr 50 tpr 5a", 0x5A, 0xFFFF, true);
	apic_write(APIC_TPR, 0x70);
	apic_icr_write(0, APIC_SH_SELF | V_PEND);
	prio_line("isr 50 irr 60 tpr 70", 0x70, 0x70, true);
	apic_write(APIC_TPR, 0x40);
	prio_line("isr 50 irr 60 tpr 40", 0x50, 0xFFFF, true);
	apic_eoi();
	prio_line("after eoi irr 60 tpr 40", 0x40, 0x60, false);
	apic_write(APIC_TPR, 0x70);
	prio_line("irr 60 tpr 70", 0x70, 0x70, false);
	apic_write(APIC_TPR, 0);
	irq_set_handler(V_HELD, NULL);
	drain();
	prio_line("drained", 0, 0, false);
	report(&g_ppr_idle, "kvm, ppr is tpr with nothing in service in %s mode");
	report(&g_ppr_isr, "ppr is the in-service class when above tpr in %s mode [isr-kept]");
	if (!apic_x2)
		report(&g_apr, "apr follows sdm 11.6.2.4 in xapic mode [kvm-apr-zero]");
}

/* ---- timer ---------------------------------------------------------------------------------------------------- */
static void timer_probe(void)
{
	char c = apic_x2 ? 'm' : 'x';
	struct grp g_dcr = { 0 }, g_count = { 0 }, g_mode = { 0 }, g_dl = { 0 };
	static const u32 dcrs[] = { 0, 0xB, 0x4, 0xF0, 0xFFFFFFF4, 0xFFFFFFFF };
	for (u32 i = 0; i < 6; i++) {
		u32 before = apic_read(APIC_TDCR);
		u32 r = apic_x2 ? wrmsr_catch(0x83E, dcrs[i]) : (mw(APIC_TDCR, dcrs[i]), 0);
		u32 d = apic_read(APIC_TDCR);
		P("P: %c tdcr %x gp %u -> %x\n", c, dcrs[i], r == GP, d);
		/* xAPIC keeps bits 0, 1 and 3 (§11.5.4); x2APIC reserved bits are the strict #GP of the table. */
		bool rsvd = dcrs[i] & ~0xBu;
		if (apic_x2 && rsvd)
			continue;
		if (r != 0 || d != (dcrs[i] & 0xB))
			GF(&g_dcr, "TDCR write %x: #GP %u, reads %x (was %x)", dcrs[i], r == GP, d, before);
	}
	report(&g_dcr, "kvm, tdcr keeps bits 0, 1 and 3 in %s mode");
	apic_write(APIC_TDCR, 0xB);
	apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	apic_write(APIC_TMICT, 0x7FFFFFFF);
	u32 cc = apic_read(APIC_TMCCT), ic = apic_read(APIC_TMICT);
	P("P: %c tmict %x tmcct %s\n", c, ic, cc == 0 ? "0" : cc <= ic ? "nonzero, <= tmict" : "above tmict");
	if (ic != 0x7FFFFFFF || cc == 0 || cc > ic)
		GF(&g_count, "TMICT %x, TMCCT %x", ic, cc);
	report(&g_count, "tmcct counts down from tmict with the lvt masked in %s mode");
	/* Mode 11b (reserved) after one-shot, then periodic, TSC-deadline, 11b again and one-shot: the field reads
	 * back as written, and only entering or leaving TSC-deadline mode clears TMICT (KVM's apic_update_lvtt). */
	static const u32 modes[] = { 0x60000, 0x20000, 0x40000, 0x60000, 0x00000 };
	static const bool counting[] = { true, true, false, false, false };
	for (u32 i = 0; i < 5; i++) {
		apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED | modes[i] | 0x40);
		cc = apic_read(APIC_TMCCT);
		u64 dl;
		u32 r = rdmsr_catch(MSR_TSC_DEADLINE, &dl);
		u32 lvtt = apic_read(APIC_LVT_TIMER), tmict = apic_read(APIC_TMICT);
		P("P: %c lvtt mode %x -> %x tmict %x tmcct %s deadline %lx gp %u\n", c, modes[i] >> 17, lvtt, tmict,
		  cc == 0 ? "0" : cc <= tmict ? "nonzero, <= tmict" : "above tmict", dl, r == GP);
		bool ok = lvtt == (APIC_LVT_MASKED | modes[i] | 0x40) && r == 0 && dl == 0 &&
			  (counting[i] ? tmict == 0x7FFFFFFF && cc != 0 && cc <= tmict : tmict == 0 && cc == 0);
		if (!ok)
			GF(&g_mode, "mode %x: LVT %x, TMICT %x, TMCCT %x, deadline %lx (#GP %u)", modes[i] >> 17, lvtt,
			   tmict, cc, dl, r == GP);
	}
	report(&g_mode, "kvm, lvt timer mode 11b reads back and counts like one-shot in %s mode");
	/* TSC_DEADLINE outside deadline mode (one-shot, masked), then in it. */
	static const u32 dmodes[] = { 0x00000, 0x20000, 0x60000, 0x40000 };
	for (u32 i = 0; i < 4; i++) {
		apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED | dmodes[i] | 0x40);
		u64 far = rdtsc() + (1ul << 40), dl;
		u32 w = wrmsr_catch(MSR_TSC_DEADLINE, far);
		u32 r = rdmsr_catch(MSR_TSC_DEADLINE, &dl);
		P("P: %c deadline in mode %x: wr gp %u rd gp %u %s\n", c, dmodes[i] >> 17, w == GP, r == GP,
		  dl == 0 ? "0" : dl == far ? "the value written" : "other");
		bool deadline_mode = dmodes[i] == 0x40000;
		if (w != 0 || r != 0 || dl != (deadline_mode ? far : 0))
			GF(&g_dl, "mode %x: WRMSR #GP %u, RDMSR #GP %u, reads %lx", dmodes[i] >> 17, w == GP, r == GP, dl);
		apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED | 0x40000 | 0x40);
		r = rdmsr_catch(MSR_TSC_DEADLINE, &dl);
		P("P: %c deadline after switch to mode 2: %s\n", c,
		  dl == 0 ? "0" : dl == far ? "the value written" : "other");
		if (dl != (deadline_mode ? far : 0))
			GF(&g_dl, "mode %x then 2: reads %lx", dmodes[i] >> 17, dl);
		wrmsr_catch(MSR_TSC_DEADLINE, 0);
		apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	}
	report(&g_dl, "tsc deadline msr reads 0 and ignores writes outside tsc-deadline mode in %s mode");
	apic_write(APIC_TMICT, 0);
	apic_write(APIC_TDCR, 0);
	restore_lvts();
}

/* ---- IA32_APIC_BASE ---------------------------------------------------------------------------------------------- */
static void base_probe(void)
{
	u64 base = rdmsr(APIC_BASE_MSR), back;
	struct grp g_bsp = { 0 }, g_rsvd = { 0 };
	static const u64 flips[] = { APIC_BASE_BSP, 1u << 0, 1u << 9, 1ul << 63 };
	for (u32 i = 0; i < 4; i++) {
		u32 r = wrmsr_catch(APIC_BASE_MSR, base ^ flips[i]);
		rdmsr_catch(APIC_BASE_MSR, &back);
		wrmsr_catch(APIC_BASE_MSR, base);
		P("P: %c apic_base %lx ^ %lx gp %u -> %lx\n", apic_x2 ? 'm' : 'x', base, flips[i], r == GP, back);
		if (i == 0 && (r != 0 || back != (base ^ flips[i])))
			GF(&g_bsp, "write %lx: #GP %u, reads %lx", base ^ flips[i], r == GP, back);
		if (i > 0 && (r != GP || back != base))
			GF(&g_rsvd, "write %lx: #GP %u, reads %lx", base ^ flips[i], r == GP, back);
	}
	if (rdmsr(APIC_BASE_MSR) != base)
		GF(&g_bsp, "not restored: %lx", rdmsr(APIC_BASE_MSR));
	report(&g_bsp, "kvm, the bsp flag of ia32_apic_base is writable (sdm vol. 4 table 2-2) in %s mode");
	report(&g_rsvd, "ia32_apic_base reserved bits 0, 9 and 63 raise gp in %s mode");
}

void guest_main(void)
{
	dump = cmdline_u64("dump", 0) != 0;
	platform_init(false);
	cli();
	base_probe();
	xapic_table();
	svr_probe();
	ldr_probe();
	icr_probe();
	prio_probe();
	timer_probe();
	if (!cpu_has_x2apic()) {
		skip("x2apic probes", "CPUID.1:ECX[21] is clear");
		return;
	}
	apic_use_x2apic(true);
	apic_enable();
	base_probe();
	x2apic_table();
	svr_probe();
	ldr_probe();
	icr_probe();
	prio_probe();
	timer_probe();
}
