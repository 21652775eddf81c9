/* xstate: the processor state a snapshot must carry beside the interrupt fabric (issue 12): the SSE registers
 * and the CPUID the guest saw. Every CPU enables SSE (CR4.OSFXSR/OSXMMEXCPT, CR0.MP set and EM clear: SDM vol. 3
 * §13.1.4), loads XMM0-15 with a pattern of its own (MOVDQU from memory, which this host's instruction emulator
 * runs), records the CPUID leaves below, then spins for a count of loop iterations (not TSC time, so a pause of
 * any length between two instructions changes nothing) and checks that the XMM registers still hold the pattern
 * and CPUID still reads the same. A host snapshots the VM mid-spin and restores it (in any irqchip mode): a
 * restore that lost the SSE state (fresh registers are zero) or changed the CPU model (`--topology`,
 * `--cpu-features`) makes a check FAIL. The guest's own code never touches an XMM register (built with
 * -mgeneral-regs-only), so nothing but the host can change them.
 *
 * Command line (multiboot): `spin=N` (loop iterations per progress step, default DEFAULT_SPIN; SPIN_STEPS steps),
 * `ymm=1` (also try AVX on CPU 0: CR4.OSXSAVE, XSETBV with XCR0 = x87|SSE|AVX, VMOVDQU to YMM0; a probe of what
 * the host allows, docs/kvm-facts.md; an emulation failure stops the VM, so it is off by default).
 *
 * Every CPU also sets CR4.OSXSAVE and XCR0 = 7 (enable_sse): a snapshot must carry them (KVM_GET_XCRS), which the
 * host-side tests read in the state file since the guest cannot.
 *
 * Output: `XSTATE: loaded` once every CPU holds its pattern and spins, `XSTATE: step k` progress lines,
 * `XSTATE: spun` at the end of the spin, then one check line per property (guests/expect/xstate.txt). */
#include "guest.h"

#define DEFAULT_SPIN 2000
#define SPIN_STEPS 10
#define CR0_MP (1ul << 1)
#define CR0_EM (1ul << 2)
#define CR4_OSFXSR (1ul << 9)
#define CR4_OSXMMEXCPT (1ul << 10)
#define CR4_OSXSAVE (1ul << 18)

/* The leaves recorded and compared: basic, features, caches, topology, KVM's signature and features, extended
 * features, address sizes. */
static const u32 LEAVES[][2] = {
	{0, 0}, {1, 0}, {4, 0}, {4, 1}, {4, 2}, {4, 3}, {7, 0}, {0xB, 0}, {0xB, 1}, {0xB, 2},
	{0x40000000, 0}, {0x40000001, 0}, {0x80000000, 0}, {0x80000001, 0}, {0x80000008, 0},
};
#define NLEAVES (sizeof(LEAVES) / sizeof(LEAVES[0]))

struct cpu_record {
	u32 cpuid_before[NLEAVES][4];
	u32 cpuid_mismatch; /* 1 + index of the first leaf that changed, 0 if none */
	u32 mismatch_reg[2];
	u8 xmm_after[256];
	u32 sse_on, xcr0_set;
	u32 loaded, done;
};
static struct cpu_record rec[MAX_CPUS];
static volatile u32 loaded_count;
static u64 spin_iters;

/* The pattern of `cpu`: byte i of XMMn is a function of the CPU, the register and the byte, never 0. */
static u8 pattern_byte(u32 cpu, u32 i) { return (u8)(0xA5 ^ (cpu * 0x3B) ^ (i * 7) ^ (i >> 4)) | 1; }

static u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" : : "r"(v) : "memory"); }

/* Catching #GP and #UD of one instruction of known length (the probe's CR4/XSETBV/VEX instructions). */
static volatile u32 catch_len[MAX_CPUS], caught[MAX_CPUS];
static void catch_fault(struct irq_frame *f, u32 cpu)
{
	if (!catch_len[cpu])
		panic("exception %lu on CPU %u at rip %lx", f->vector, cpu, f->rip);
	caught[cpu] = (u32)f->vector + 1;
	f->rip += catch_len[cpu];
}

static void write_cr4_caught(u32 cpu, u64 v)
{
	catch_len[cpu] = 3; /* 0F 22 E0: mov %rax, %cr4 */
	__asm__ volatile(".byte 0x0f, 0x22, 0xe0" : : "a"(v) : "memory");
	catch_len[cpu] = 0;
}

/* XGETBV of XCR0 (0F 01 D0); all ones if it faulted. */
static u64 read_xcr0_caught(u32 cpu)
{
	u32 lo = ~0u, hi = ~0u;
	caught[cpu] = 0;
	catch_len[cpu] = 3;
	__asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "+a"(lo), "+d"(hi) : "c"(0) : "memory");
	catch_len[cpu] = 0;
	return caught[cpu] ? ~0ul : ((u64)hi << 32) | lo;
}

/* SSE on, then XSAVE's controls as an OS that uses AVX sets them: CR4.OSXSAVE and XCR0 = x87|SSE|AVX (SDM vol. 1
 * §13.3). This host lets both through although the VMM's CPUID table hides XSAVE, but cannot run XGETBV or a VEX
 * instruction (docs/kvm-facts.md): the guest cannot read XCR0 back, a snapshot shows it (KVM_GET_XCRS). */
static void enable_sse(u32 cpu)
{
	write_cr0((read_cr0() | CR0_MP) & ~CR0_EM);
	caught[cpu] = 0;
	write_cr4_caught(cpu, read_cr4() | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE);
	rec[cpu].sse_on = (read_cr4() & CR4_OSFXSR) != 0;
	if (caught[cpu] || !(read_cr4() & CR4_OSXSAVE))
		return;
	catch_len[cpu] = 3; /* 0F 01 D1: xsetbv */
	__asm__ volatile(".byte 0x0f, 0x01, 0xd1" : : "c"(0), "a"(7), "d"(0) : "memory");
	catch_len[cpu] = 0;
	rec[cpu].xcr0_set = !caught[cpu];
}

static void xmm_load(const u8 *p)
{
	__asm__ volatile("movdqu 0(%0), %%xmm0\n\tmovdqu 16(%0), %%xmm1\n\tmovdqu 32(%0), %%xmm2\n\t"
			 "movdqu 48(%0), %%xmm3\n\tmovdqu 64(%0), %%xmm4\n\tmovdqu 80(%0), %%xmm5\n\t"
			 "movdqu 96(%0), %%xmm6\n\tmovdqu 112(%0), %%xmm7\n\tmovdqu 128(%0), %%xmm8\n\t"
			 "movdqu 144(%0), %%xmm9\n\tmovdqu 160(%0), %%xmm10\n\tmovdqu 176(%0), %%xmm11\n\t"
			 "movdqu 192(%0), %%xmm12\n\tmovdqu 208(%0), %%xmm13\n\tmovdqu 224(%0), %%xmm14\n\t"
			 "movdqu 240(%0), %%xmm15"
			 :
			 : "r"(p)
			 : "memory");
}

static void xmm_store(u8 *p)
{
	__asm__ volatile("movdqu %%xmm0, 0(%0)\n\tmovdqu %%xmm1, 16(%0)\n\tmovdqu %%xmm2, 32(%0)\n\t"
			 "movdqu %%xmm3, 48(%0)\n\tmovdqu %%xmm4, 64(%0)\n\tmovdqu %%xmm5, 80(%0)\n\t"
			 "movdqu %%xmm6, 96(%0)\n\tmovdqu %%xmm7, 112(%0)\n\tmovdqu %%xmm8, 128(%0)\n\t"
			 "movdqu %%xmm9, 144(%0)\n\tmovdqu %%xmm10, 160(%0)\n\tmovdqu %%xmm11, 176(%0)\n\t"
			 "movdqu %%xmm12, 192(%0)\n\tmovdqu %%xmm13, 208(%0)\n\tmovdqu %%xmm14, 224(%0)\n\t"
			 "movdqu %%xmm15, 240(%0)"
			 :
			 : "r"(p)
			 : "memory");
}

static void read_leaves(u32 out[NLEAVES][4])
{
	for (u32 i = 0; i < NLEAVES; i++)
		cpuid(LEAVES[i][0], LEAVES[i][1], &out[i][0], &out[i][1], &out[i][2], &out[i][3]);
}

/* One CPU's life: SSE on, pattern in, CPUID recorded, spin, everything compared. CPU 0 prints the progress. */
static void xstate_run(void *unused)
{
	u32 cpu = this_cpu();
	struct cpu_record *r = &rec[cpu];
	u8 pattern[256];
	for (u32 i = 0; i < 256; i++)
		pattern[i] = pattern_byte(cpu, i);
	enable_sse(cpu);
	read_leaves(r->cpuid_before);
	if (r->sse_on)
		xmm_load(pattern);
	WRITE_ONCE(r->loaded, 1);
	atomic_inc(&loaded_count);
	if (cpu == 0) {
		wait_eq(&loaded_count, ncpus, 10000);
		printf("XSTATE: loaded\n");
	}
	for (u32 step = 0; step < SPIN_STEPS; step++) {
		for (volatile u64 n = 0; n < spin_iters; n++)
			cpu_relax();
		if (cpu == 0)
			printf("XSTATE: step %u\n", step + 1);
	}
	if (r->sse_on)
		xmm_store(r->xmm_after);
	u32 now[NLEAVES][4];
	read_leaves(now);
	for (u32 i = 0; i < NLEAVES && !r->cpuid_mismatch; i++)
		for (u32 reg = 0; reg < 4; reg++)
			if (now[i][reg] != r->cpuid_before[i][reg]) {
				r->cpuid_mismatch = i + 1;
				r->mismatch_reg[0] = r->cpuid_before[i][reg];
				r->mismatch_reg[1] = now[i][reg];
				break;
			}
	WRITE_ONCE(r->done, 1);
}

/* The probe behind `ymm=1`: what AVX this host lets a guest of this VMM use. */
static void probe_ymm(void)
{
	u32 cpu = this_cpu();
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	printf("INFO: cpuid.1:ecx xsave %u avx %u\n", (c >> 26) & 1, (c >> 28) & 1);
	caught[cpu] = 0;
	write_cr4_caught(cpu, read_cr4() | CR4_OSXSAVE);
	printf("INFO: cr4.osxsave write: %s, cr4 %lx\n", caught[cpu] ? "fault" : "ok", read_cr4());
	if (caught[cpu])
		return;
	caught[cpu] = 0;
	catch_len[cpu] = 3; /* 0F 01 D1: xsetbv */
	__asm__ volatile(".byte 0x0f, 0x01, 0xd1" : : "c"(0), "a"(7), "d"(0) : "memory");
	catch_len[cpu] = 0;
	printf("INFO: xsetbv xcr0=7: %s (vector %u)\n", caught[cpu] ? "fault" : "ok", caught[cpu] ? caught[cpu] - 1 : 0);
	if (caught[cpu])
		return;
	printf("INFO: xgetbv: xcr0 %lx\n", read_xcr0_caught(cpu));
	static u8 in[32], out[32];
	for (u32 i = 0; i < 32; i++)
		in[i] = (u8)(i * 9 + 1);
	caught[cpu] = 0;
	catch_len[cpu] = 4; /* C5 FE 6F 00: vmovdqu (%rax), %ymm0 */
	__asm__ volatile(".byte 0xc5, 0xfe, 0x6f, 0x00" : : "a"(in) : "memory");
	catch_len[cpu] = 4; /* C5 FE 7F 00: vmovdqu %ymm0, (%rax) */
	__asm__ volatile(".byte 0xc5, 0xfe, 0x7f, 0x00" : : "a"(out) : "memory");
	catch_len[cpu] = 0;
	printf("INFO: vmovdqu ymm0: %s, round trip %s\n", caught[cpu] ? "fault" : "ok",
	       memcmp(in, out, 32) == 0 ? "equal" : "different");
}

void guest_main(void)
{
	irq_set_handler(6, catch_fault);
	irq_set_handler(13, catch_fault);
	spin_iters = cmdline_u64("spin", DEFAULT_SPIN);
	platform_init(false);
	u32 online = smp_start_all();
	check(online == ncpus, "all cpus online", "%u of %u", online, ncpus);
	if (cmdline_u64("ymm", 0))
		probe_ymm();
	for (u32 c = 1; c < ncpus; c++)
		smp_call_async(c, xstate_run, NULL);
	xstate_run(NULL);
	for (u32 c = 1; c < ncpus; c++)
		smp_wait(c, 60000);
	printf("XSTATE: spun\n");

	u32 sse_off = 0, xcr0_unset = 0, not_done = 0, xmm_bad = 0, xmm_cpu = 0, xmm_byte = 0, cpuid_bad = 0, cpuid_cpu = 0;
	for (u32 c = 0; c < ncpus; c++) {
		const struct cpu_record *r = &rec[c];
		sse_off += !r->sse_on;
		xcr0_unset += !r->xcr0_set;
		not_done += !READ_ONCE(r->done);
		for (u32 i = 0; i < 256 && r->sse_on; i++)
			if (r->xmm_after[i] != pattern_byte(c, i)) {
				if (!xmm_bad++) {
					xmm_cpu = c;
					xmm_byte = i;
				}
			}
		if (r->cpuid_mismatch && !cpuid_bad++)
			cpuid_cpu = c;
	}
	check(sse_off == 0, "sse enabled on every cpu", "%u cpus without CR4.OSFXSR", sse_off);
	check(xcr0_unset == 0, "cr4.osxsave and xcr0 7 set on every cpu", "%u cpus refused", xcr0_unset);
	check(not_done == 0, "spin ended on every cpu", "%u cpus did not finish", not_done);
	check(xmm_bad == 0, "xmm0-15 kept across the spin on every cpu",
	      "%u bytes differ, first cpu %u xmm%u byte %u: %x, not %x", xmm_bad, xmm_cpu, xmm_byte / 16, xmm_byte % 16,
	      rec[xmm_cpu].xmm_after[xmm_byte], pattern_byte(xmm_cpu, xmm_byte));
	const struct cpu_record *m = &rec[cpuid_cpu];
	u32 leaf = m->cpuid_mismatch ? m->cpuid_mismatch - 1 : 0;
	check(cpuid_bad == 0, "cpuid the same after the spin on every cpu",
	      "%u cpus differ, first cpu %u leaf %x.%u: %x before, %x after", cpuid_bad, cpuid_cpu, LEAVES[leaf][0],
	      LEAVES[leaf][1], m->mismatch_reg[0], m->mismatch_reg[1]);
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	printf("INFO: cpuid.1 ebx %x ecx %x (x2apic %u tsc-deadline %u)\n", b, c, (c >> 21) & 1, (c >> 24) & 1);
}
