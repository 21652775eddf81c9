/* fuzz: a hostile guest. From a seed (multiboot command line `seed=S`, default 1; `ops=N` ops per CPU,
 * default 400; `trace=1`: CPU 0 prints every op; `dead_holder=1`: see worker()) every CPU issues a long random sequence over every
 * guest-facing interrupt surface: the xAPIC page at any offset with 1/2/4/8-byte and unaligned accesses, x2APIC MSRs 0x800-0x8FF, IA32_APIC_BASE
 * transitions (illegal ones and reserved bits included), TSC_DEADLINE, IOAPIC IOREGSEL/IOWIN with any index,
 * the PIC and ELCR ports, pc-testdev lines (raised far more often than lowered), irqvm's MSI doorbell, ICRs of every delivery mode,
 * trigger, shorthand and destination (to itself, to others, to absent IDs), TPR/CR8 games, EOIs with
 * nothing in service, and KVM's paravirtual EOI (MSR_KVM_PV_EOI_EN: words of its own or another CPU's,
 * unaligned or outside RAM, off again, and the word scribbled on while the hypervisor may have set it). The VMM must survive all of it; the guest only has to survive itself.
 *
 * What keeps the guest alive (and the run finite), so that any crash or hang is the VMM's:
 *  - CPU 0 is the controller and heartbeat: nothing ever sends it INIT or SMI (physical destinations other
 *    than 0 and the broadcasts only; no INIT/SMI in its own LVTs; no IOAPIC entry with INIT/SMI/SIPI), and
 *    it never changes its xAPIC ID. It runs its ops, then ends the run itself through isa-debug-exit.
 *  - An AP may be INITed: it then waits for a SIPI, and every SIPI that can reach a live CPU carries the
 *    vector of a parking page (`cli; hlt`, with a real-mode IVT pointing there), so it stays parked.
 *  - Every vector that can be delivered is >= 0x20 (a vector below 32 would run an exception stub that
 *    expects an error code); the PIC is only programmed with bases >= 0x20.
 *  - MSR accesses use rdmsr_catch/wrmsr_catch with interrupts off; the interrupt handler EOIs in whatever
 *    mode the APIC is in now (it reads IA32_APIC_BASE), so the guest's own mode games cannot break it.
 *  - The IOAPIC and the PIC are shared: a CPU touches them only under a try-lock of a few tries (an INITed
 *    holder just makes the others skip those ops, cheaply), so the value sanitised for a register reaches
 *    that register.
 *  - The xAPIC page only ever moves to addresses with no RAM behind them.
 * The sequence of operations of each CPU depends only on the seed, the CPU index and the CPU count.
 */
#include "guest.h"

#define GP_CAUGHT (13 + 1)
#define PARK_VECTOR 0x09 /* SIPI vector of the parking page */
#define PARK_ADDR (PARK_VECTOR << 12)
#define IOAPIC_MMIO 0xFEC00000ul
#define MSR_APIC_BASE 0x1B
#define BASE_EN (1ul << 11)
#define BASE_EXTD (1ul << 10)
#define BASE_BSP (1ul << 8)

static u64 seed = 1, ops_per_cpu = 400, trace, dead_holder;
static volatile u32 stop_all;
static volatile u64 ops_done[MAX_CPUS], faults[MAX_CPUS], irqs[MAX_CPUS];
static spinlock_t shared_dev; /* the IOAPIC and PIC (try-lock only) */

/* ---- deterministic random numbers (splitmix64 seeding, xorshift64*) ---------------------------------------- */
static u64 rng_state[MAX_CPUS];
static u64 splitmix(u64 x)
{
	x += 0x9E3779B97F4A7C15ul;
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ul;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBul;
	return x ^ (x >> 31);
}
static u64 rnd(u32 cpu)
{
	u64 x = rng_state[cpu];
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state[cpu] = x;
	return x * 0x2545F4914F6CDD1Dul;
}
static u32 below(u32 cpu, u32 n) { return (u32)(rnd(cpu) % n); }

/* ---- command line ------------------------------------------------------------------------------------------ */
static u64 parse_u64(const char *s)
{
	u64 v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	return v;
}
static void parse_cmdline(void)
{
	const u32 *info = (const u32 *)(u64)multiboot_info;
	if (!info || !(info[0] & (1u << 2)))
		return;
	const char *p = (const char *)(u64)info[4];
	for (; *p; p++) {
		if ((p[0] == 's' && !memcmp(p, "seed=", 5)))
			seed = parse_u64(p + 5);
		else if (p[0] == 'o' && !memcmp(p, "ops=", 4))
			ops_per_cpu = parse_u64(p + 4);
		else if (p[0] == 't' && !memcmp(p, "trace=", 6))
			trace = parse_u64(p + 6);
		else if (p[0] == 'd' && !memcmp(p, "dead_holder=", 12))
			dead_holder = parse_u64(p + 12);
	}
}

/* ---- raw accesses ------------------------------------------------------------------------------------------ */
static u64 mmio_read(u64 addr, u32 size)
{
	u64 v = 0;
	switch (size) {
	case 1: __asm__ volatile("movb (%1), %b0" : "=q"(v) : "r"(addr) : "memory"); break;
	case 2: __asm__ volatile("movw (%1), %w0" : "=r"(v) : "r"(addr) : "memory"); break;
	case 4: __asm__ volatile("movl (%1), %k0" : "=r"(v) : "r"(addr) : "memory"); break;
	default: __asm__ volatile("movq (%1), %0" : "=r"(v) : "r"(addr) : "memory"); break;
	}
	return v;
}
static void mmio_write(u64 addr, u32 size, u64 v)
{
	switch (size) {
	case 1: __asm__ volatile("movb %b0, (%1)" : : "q"(v), "r"(addr) : "memory"); break;
	case 2: __asm__ volatile("movw %w0, (%1)" : : "r"(v), "r"(addr) : "memory"); break;
	case 4: __asm__ volatile("movl %k0, (%1)" : : "r"(v), "r"(addr) : "memory"); break;
	default: __asm__ volatile("movq %0, (%1)" : : "r"(v), "r"(addr) : "memory"); break;
	}
}
static void count_fault(u32 cpu, u32 r)
{
	if (r)
		faults[cpu]++;
}
static u64 apic_base_now(void) { return rdmsr(MSR_APIC_BASE); }
static u64 page_of(u64 base) { return base & 0xFFFFFF000ul; }

/* ---- sanitising: keep every deliverable vector >= 0x20 and INIT/SMI/SIPI away from CPU 0 ------------------- */
static u32 safe_vector(u32 v) { return v >= 0x20 && v <= 0xFE ? v : 0x20 + v % 0xDF; }
static bool bad_for_cpu0(u32 dm) { return dm == 5 || dm == 2; } /* INIT, SMI */

/* An LVT value (SDM Figure 11-8): vector kept deliverable; CPU 0 gets NMI instead of INIT or SMI. CPU 0's
 * timer LVT stays fixed: KVM reads a delivery mode from the timer LVT too, and a periodic NMI every 200 us
 * (KVM's floor) outruns the NMI handler on this emulating host, so CPU 0 would never get back to its ops. */
static u32 sanitize_lvt(u32 cpu, u32 reg, u32 v)
{
	u32 dm = (v >> 8) & 7;
	if (cpu == 0 && reg == APIC_LVT_TIMER)
		v &= ~0x700u;
	else if (cpu == 0 && (bad_for_cpu0(dm) || dm == 6))
		v = (v & ~0x700u) | 0x400u;
	return (v & ~0xFFu) | safe_vector(v & 0xFF);
}

/* A destination that can never be CPU 0 nor a broadcast: another CPU (or this AP itself), or an absent ID. */
static u32 dest_not_cpu0(u32 cpu, bool x2)
{
	if (ncpus > 1 && below(cpu, 3) != 0)
		return 1 + below(cpu, ncpus - 1);
	if (cpu != 0 && below(cpu, 2))
		return cpu;
	return x2 ? 0x100 + below(cpu, 0x1000) : ncpus + below(cpu, 0xFE - ncpus); /* 0xFF is a broadcast */
}

/* ICR low half and destination, sanitised. */
static void sanitize_icr(u32 cpu, bool x2, u32 *lo, u32 *dest)
{
	u32 dm = (*lo >> 8) & 7;
	if (dm == 0 || dm == 1) {
		*lo = (*lo & ~0xFFu) | safe_vector(*lo & 0xFF);
	} else if (bad_for_cpu0(dm) || dm == 6) {
		/* Physical, no shorthand, never CPU 0; a SIPI that may reach a live CPU parks it. */
		*lo &= ~(0xC0000u | 0x800u);
		*dest = dest_not_cpu0(cpu, x2);
		if (dm == 6 && *dest < ncpus)
			*lo = (*lo & ~0xFFu) | PARK_VECTOR;
	}
}

/* An IOAPIC redirection entry's low half: deliverable vector, no INIT/SMI/SIPI (they could reach CPU 0). */
static u32 sanitize_rte(u32 v)
{
	u32 dm = (v >> 8) & 7;
	if (bad_for_cpu0(dm) || dm == 6)
		v &= ~0x700u;
	return (v & ~0xFFu) | safe_vector(v & 0xFF);
}

/* ---- KVM's paravirtual EOI --------------------------------------------------------------------------------- */
/* Each CPU's block of words for MSR_KVM_PV_EOI_EN. The MSR only ever points into these blocks (a CPU's own or
 * another's), so whatever the hypervisor writes there lands in memory nothing else uses. */
#define PV_WORDS 16
static volatile u32 pv_words[MAX_CPUS][PV_WORDS] __attribute__((aligned(64)));
static volatile u64 pv_eoi_msr[MAX_CPUS]; /* the value this CPU's MSR last accepted */

/* The handler's EOI through the flag, as Linux does it: if PV EOI is on and bit 0 of the word is set, clearing
 * it is the EOI. A flag the guest set itself (op_pv_eoi's scribbles) is taken the same way and leaves its
 * vector in service: the guest's own harm, which only blocks this CPU's lower vectors. */
static bool pv_eoi_taken(u32 cpu)
{
	u64 msr = pv_eoi_msr[cpu], word = msr & ~1ul;
	u64 first = (u64)(usize)&pv_words[0][0], end = first + sizeof(pv_words);
	/* Only a word in the blocks: a hypervisor that accepted an address without RAM (an APIC access page)
	 * gets no guest access there. */
	return (msr & 1) && word >= first && word < end && pv_eoi_take((volatile u32 *)(usize)word);
}

/* ---- interrupt handler: EOI in whatever APIC mode this CPU is in now --------------------------------------- */
static void fuzz_irq(struct irq_frame *f, u32 cpu)
{
	/* Return with IF=0: a level line that stays high (or an AEOI PIC) re-delivers at once after the EOI,
	 * and would otherwise keep the CPU in its handler forever (on hardware too). */
	f->rflags &= ~0x200ul;
	irqs[cpu]++;
	if (pv_eoi_taken(cpu))
		return;
	u64 base = apic_base_now();
	if (base & BASE_EXTD)
		wrmsr_catch(0x80B, 0);
	else if (base & BASE_EN)
		mmio_write(page_of(base) + APIC_EOI, 4, 0);
}
static void spurious_irq(struct irq_frame *f, u32 cpu)
{
	f->rflags &= ~0x200ul;
	irqs[cpu]++;
}

/* Every other NMI sets IF for two instructions: NMI blocking holds back NMIs only (SDM vol. 3 §6.7.1), so an
 * interrupt pending now is taken inside this handler, and its IRETQ ends NMI blocking, so an NMI held meanwhile
 * nests here. fuzz_irq returns with IF=0, so at most one interrupt comes in; the NMI's IRETQ restores the IF
 * of the code it interrupted (inside rdmsr_catch too, whose state nests). */
static volatile u32 nmi_calls[MAX_CPUS];
static void fuzz_nmi(struct irq_frame *f, u32 cpu)
{
	if (++nmi_calls[cpu] & 1)
		__asm__ volatile("sti; nop; nop; cli" ::: "memory");
}

/* ---- the operations ---------------------------------------------------------------------------------------- */
static const u64 safe_bases[] = { 0xFEE00000ul, 0xFEB00000ul, 0xFED00000ul, 0xC0000000ul };
static const u32 lvt_regs[] = { 0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370 };

static u64 random_value(u32 cpu)
{
	switch (below(cpu, 5)) {
	case 0: return 0;
	case 1: return below(cpu, 256);
	case 2: return (u32)rnd(cpu);
	case 3: return rnd(cpu);
	default: return ~0ul >> below(cpu, 64);
	}
}
static u32 random_size(u32 cpu) { return 1u << below(cpu, 4); }
static u32 random_reg_offset(u32 cpu)
{
	u32 off = below(cpu, 0x40) << 4;
	if (below(cpu, 4) == 0)
		off = below(cpu, 0x1000); /* anywhere, unaligned included */
	return off;
}

static void op_icr(u32 cpu)
{
	u64 base = apic_base_now();
	bool x2 = base & BASE_EXTD;
	u32 lo = (u32)rnd(cpu) & 0xCCFFFu; /* vector, delivery mode, dest mode, level, trigger, shorthand */
	u32 dm = (lo >> 8) & 7;
	if ((dm == 5 || dm == 2) && below(cpu, 8) != 0)
		lo &= ~0x700u; /* INIT and SMI rarely, so that the APs live long enough to matter */
	u32 dest;
	switch (below(cpu, 4)) {
	case 0: dest = cpu; break;
	case 1: dest = below(cpu, ncpus); break;
	case 2: dest = ncpus + below(cpu, 4); break;
	default: dest = x2 ? (u32)rnd(cpu) : below(cpu, 256); break;
	}
	sanitize_icr(cpu, x2, &lo, &dest);
	if (x2) {
		count_fault(cpu, wrmsr_catch(0x830, ((u64)dest << 32) | lo));
	} else if (base & BASE_EN) {
		mmio_write(page_of(base) + APIC_ICR2, 4, (u64)dest << 24);
		mmio_write(page_of(base) + APIC_ICR, 4, lo);
	}
}

/* A sanitised 32-bit write to APIC register `reg` (a multiple of 16) in the current mode. */
static void apic_reg_write(u32 cpu, u32 reg, u64 value)
{
	u64 base = apic_base_now();
	bool x2 = base & BASE_EXTD;
	if (reg == APIC_ICR) {
		op_icr(cpu);
		return;
	}
	if (reg == APIC_ID && cpu == 0)
		return;
	u32 v = (u32)value;
	for (u32 i = 0; i < sizeof(lvt_regs) / sizeof(lvt_regs[0]); i++)
		if (reg == lvt_regs[i])
			v = sanitize_lvt(cpu, reg, v);
	if (reg == APIC_SELF_IPI)
		v = safe_vector(v & 0xFF);
	bool sanitized = v != (u32)value || reg == APIC_SELF_IPI;
	for (u32 i = 0; i < sizeof(lvt_regs) / sizeof(lvt_regs[0]); i++)
		sanitized |= reg == lvt_regs[i];
	if (x2) /* a full 64-bit value where no vector lives: reserved bits must #GP */
		count_fault(cpu, wrmsr_catch(0x800 + (reg >> 4), sanitized || below(cpu, 2) ? v : value));
	else if (base & BASE_EN)
		mmio_write(page_of(base) + reg, 4, v);
}

static void op_xapic_mmio(u32 cpu)
{
	u64 base = apic_base_now(), page = page_of(base);
	u32 off = random_reg_offset(cpu), size = random_size(cpu);
	if (!(base & BASE_EN) || (base & BASE_EXTD) || below(cpu, 3)) {
		mmio_read(page + off, size);
		return;
	}
	u64 v = random_value(cpu);
	/* Aligned dword writes reach the register (both KVM and irqvm drop the others, SDM 11.4.1): sanitise
	 * those; a wider or misaligned write is sanitised in its first dword as well, to be safe. */
	if ((off & 0xF) == 0 && size >= 4) {
		apic_reg_write(cpu, off, v);
		if (size == 8)
			mmio_write(page + off, 8, (v & ~0xFFFFFFFFul) | (u32)mmio_read(page + off, 4));
		return;
	}
	u32 reg = off & ~0xFu;
	bool vector_reg = reg == APIC_ICR || reg == APIC_ID || reg == APIC_SELF_IPI;
	for (u32 i = 0; i < sizeof(lvt_regs) / sizeof(lvt_regs[0]); i++)
		vector_reg |= reg == lvt_regs[i];
	if (!vector_reg)
		mmio_write(page + off, size, v);
	else
		mmio_read(page + off, size);
}

static void op_x2apic_msr(u32 cpu)
{
	u32 msr = 0x800 + below(cpu, 0x100);
	u64 v;
	if (below(cpu, 2)) {
		count_fault(cpu, rdmsr_catch(msr, &v));
		return;
	}
	u32 reg = (msr - 0x800) << 4;
	bool special = reg == APIC_ICR || reg == APIC_SELF_IPI || reg == APIC_ID;
	for (u32 i = 0; i < sizeof(lvt_regs) / sizeof(lvt_regs[0]); i++)
		special |= reg == lvt_regs[i];
	if (!(apic_base_now() & BASE_EXTD)) /* not in x2APIC mode: every x2APIC MSR is #GP */
		count_fault(cpu, wrmsr_catch(msr, random_value(cpu)));
	else if (special)
		apic_reg_write(cpu, reg, random_value(cpu));
	else
		count_fault(cpu, wrmsr_catch(msr, random_value(cpu)));
}

static void op_apic_base(u32 cpu)
{
	u64 now = apic_base_now();
	u64 v = safe_bases[below(cpu, 4)] | (now & BASE_BSP);
	switch (below(cpu, 5)) {
	case 0: break;                          /* disabled */
	case 1: v |= BASE_EXTD; break;          /* EXTD without EN: illegal */
	case 2: v |= BASE_EN | BASE_EXTD; break;
	default: v |= BASE_EN; break;
	}
	if (below(cpu, 6) == 0) {
		static const u32 rsvd[] = { 0, 1, 2, 3, 4, 5, 6, 7, 9, 36, 39, 40, 46, 47, 48, 51, 52, 63 };
		v |= 1ul << rsvd[below(cpu, sizeof(rsvd) / sizeof(rsvd[0]))];
	}
	if (cpu == 0 && below(cpu, 8) == 0)
		v ^= BASE_BSP; /* only on CPU 0, which no INIT reaches: an AP marked BSP restarts at FFFFFFF0H on INIT */
	count_fault(cpu, wrmsr_catch(MSR_APIC_BASE, v));
}

static void op_tsc_deadline(u32 cpu)
{
	u64 v;
	if (below(cpu, 3) == 0) {
		count_fault(cpu, rdmsr_catch(MSR_TSC_DEADLINE, &v));
		return;
	}
	switch (below(cpu, 4)) {
	case 0: v = 0; break;
	case 1: v = rdtsc() + below(cpu, 200000); break;
	case 2: v = rdtsc() - below(cpu, 1000000); break;
	default: v = rnd(cpu); break;
	}
	count_fault(cpu, wrmsr_catch(MSR_TSC_DEADLINE, v));
}

/* A few tries only. An AP INITed inside its critical section never releases the lock, and every later IOAPIC
 * or PIC op of every CPU then fails its try-lock; this host emulates each guest instruction (about 1-3 us, far
 * more on a loaded machine), so the 2000 tries this once made cost the heartbeat ~14,000 instructions per such
 * op and stretched a 3000-op run past the watchdog's 60 s (issue 10's split-mode "stalls": vCPU 0 inside
 * KVM_RUN, in system time, emulating this loop; docs/fuzzing.md). A live holder keeps it for one or two
 * accesses, so giving up soon only skips an op. */
#define SHARED_TRIES 16
#define NO_HOLDER 0xFFFFFFFFu
static volatile u32 shared_holder = NO_HOLDER;
static volatile u64 shared_skipped[MAX_CPUS], shared_spins[MAX_CPUS];
static bool try_lock_shared(u32 cpu)
{
	for (u32 i = 0; i < SHARED_TRIES; i++) {
		if (!atomic_xchg(&shared_dev.locked, 1)) {
			shared_holder = cpu;
			return true;
		}
		shared_spins[cpu]++;
		cpu_relax();
	}
	shared_skipped[cpu]++;
	return false;
}
static void unlock_shared(void)
{
	shared_holder = NO_HOLDER;
	spin_unlock(&shared_dev);
}

static void op_ioapic(u32 cpu)
{
	if (!try_lock_shared(cpu))
		return;
	u32 sel = below(cpu, 4) ? below(cpu, 0x40) : below(cpu, 256);
	switch (below(cpu, 5)) {
	case 0: /* any access at any offset, writes only where no window value can land */
		{
			u32 off = below(cpu, 0x100), size = random_size(cpu);
			if (below(cpu, 2) || (off >= 0x08 && off < 0x20))
				mmio_read(IOAPIC_MMIO + off, size);
			else
				mmio_write(IOAPIC_MMIO + off, size, random_value(cpu));
			break;
		}
	case 1: /* EOI register (version 0x20) with any vector */
		mmio_write(IOAPIC_MMIO + 0x40, 4, below(cpu, 256));
		break;
	case 2:
		mmio_write(IOAPIC_MMIO, 4, sel);
		mmio_read(IOAPIC_MMIO + 0x10, 4);
		break;
	default: {
		u32 v = (u32)random_value(cpu);
		if (sel >= 0x10 && (sel & 1) == 0)
			v = sanitize_rte(v);
		mmio_write(IOAPIC_MMIO, 4, sel);
		mmio_write(IOAPIC_MMIO + 0x10, 4, v);
		break;
	}
	}
	unlock_shared();
}

static void op_pic(u32 cpu)
{
	static const u16 ports[] = { 0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1 };
	if (!try_lock_shared(cpu))
		return;
	u16 port = ports[below(cpu, 6)];
	u8 v = (u8)rnd(cpu);
	switch (below(cpu, 4)) {
	case 0: inb(port); break;
	case 1: /* a full re-initialisation with a legal vector base */
		{
			bool slave = below(cpu, 2);
			u16 cmd = slave ? 0xA0 : 0x20;
			outb(cmd, 0x11 | (v & 0x0A));           /* ICW1: edge/level, ICW4 needed */
			outb(cmd + 1, 0x20 + (below(cpu, 28) << 3)); /* ICW2: base 0x20-0xF8 */
			if (!(v & 0x02))
				outb(cmd + 1, slave ? 2 : 4); /* ICW3 (not in single mode) */
			outb(cmd + 1, 0x01 | (v & 0x12)); /* ICW4: 8086, maybe AEOI, special fully nested */
			break;
		}
	default:
		if (port == 0x20 || port == 0xA0)
			v &= ~0x10; /* OCW2/OCW3 only: a random ICW1 would take a random vector base next */
		outb(port, v);
		break;
	}
	unlock_shared();
}

static void op_testdev(u32 cpu)
{
	outb(0x2000 + below(cpu, 24), below(cpu, 8) != 0); /* level lines are raised far more than lowered */
}

/* irqvm's MSI doorbell (port 0x2020; an unclaimed port on QEMU): one message to any destination, physical or
 * logical, with the data sanitised as an IOAPIC entry's (no INIT, SMI or SIPI: a logical destination may
 * include CPU 0; reserved delivery mode 011 is kept, and refused), and now and then a reserved bit (23:18) set,
 * which drops the write. */
static void op_doorbell(u32 cpu)
{
	u32 v = (u32)rnd(cpu);
	u32 reserved = below(cpu, 8) == 0 ? 0x00FC0000u : 0;
	outl(0x2020, (v & (0xFF030000u | reserved)) | (sanitize_rte(v) & 0xFFFFu));
}

static void op_tpr(u32 cpu)
{
	if (below(cpu, 2)) {
		u64 cr8 = below(cpu, 16);
		__asm__ volatile("movq %0, %%cr8" : : "r"(cr8) : "memory");
	} else {
		apic_reg_write(cpu, APIC_TPR, below(cpu, 256));
	}
}

static void op_eoi(u32 cpu)
{
	apic_reg_write(cpu, APIC_EOI, below(cpu, 4) ? 0 : random_value(cpu));
}

static void op_timer(u32 cpu)
{
	u32 r = below(cpu, 3);
	if (r == 0)
		apic_reg_write(cpu, APIC_TMICT, below(cpu, 2) ? below(cpu, 5000) : (u32)rnd(cpu));
	else if (r == 1)
		apic_reg_write(cpu, APIC_TDCR, below(cpu, 16));
	else
		apic_reg_write(cpu, APIC_LVT_TIMER, rnd(cpu));
}

/* MSR_KVM_PV_EOI_EN (offered in every mode): on at a word of this CPU's block or another CPU's (two CPUs
 * sharing one flag), at an address not 4-byte aligned (#GP), outside RAM (#GP), off, read back; or the word
 * itself scribbled on: bit 0 set or cleared by the guest, whether or not the hypervisor set it. */
static void op_pv_eoi(u32 cpu)
{
	u32 other = below(cpu, ncpus);
	u64 word = (u64)(usize)&pv_words[below(cpu, 4) ? cpu : other][below(cpu, PV_WORDS)];
	u64 v;
	switch (below(cpu, 8)) {
	case 0: v = 0; break;
	case 1: case 2: case 3: v = word | 1; break;
	case 4: v = (word + 1 + below(cpu, 3)) | below(cpu, 2); break; /* not 4-byte aligned */
	case 5: v = (below(cpu, 2) ? 0xFEE00000ul : 1ul << (36 + below(cpu, 12))) | 1; break; /* no RAM */
	case 6: {
		volatile u32 *w = (volatile u32 *)(usize)word;
		*w = below(cpu, 2) ? *w ^ 1 : (u32)rnd(cpu);
		return;
	}
	default:
		count_fault(cpu, rdmsr_catch(MSR_KVM_PV_EOI_EN, &v));
		return;
	}
	u32 r = wrmsr_catch(MSR_KVM_PV_EOI_EN, v);
	count_fault(cpu, r);
	if (!r)
		pv_eoi_msr[cpu] = v;
}

/* Lets pending interrupts in; an AP may also halt (CPU 0 never does: it must end the run). The CLI after the
 * HLT matters: an NMI ends a halt without a handler clearing IF in an interrupt frame, and the ops after it
 * must run with interrupts off (seed 22116 on 4 vCPUs took an interrupt inside rdmsr_catch that way). */
static void op_window(u32 cpu)
{
	if (cpu != 0 && below(cpu, 8) == 0) {
		sti_hlt();
		cli();
	} else
		__asm__ volatile("sti; nop; nop; nop; cli" ::: "memory");
}

static void (*const ops[])(u32) = {
	op_xapic_mmio, op_xapic_mmio, op_xapic_mmio, op_x2apic_msr, op_x2apic_msr, op_apic_base, op_tsc_deadline,
	op_icr,        op_icr,        op_ioapic,     op_ioapic,     op_pic,        op_testdev,    op_tpr,
	op_eoi,        op_timer,      op_window,     op_window,     op_doorbell,   op_pv_eoi,
};

static volatile u32 started[MAX_CPUS];
static void fuzz_loop(u32 cpu)
{
	cli();
	WRITE_ONCE(started[cpu], 1);
	for (u64 i = 0; i < ops_per_cpu && !READ_ONCE(stop_all); i++) {
		u32 op = below(cpu, sizeof(ops) / sizeof(ops[0]));
		/* CPU 0 (the heartbeat) reports progress; with trace=1 every op, to find where a run stops. */
		if (cpu == 0 && (trace || (i % 1000 == 0 && i)))
			printf("FUZZ: cpu 0 op %lu (kind %u), apic base %lx, nmis %u, irqs %lu\n", i, op, apic_base_now(), irq_count[0][2], irqs[0]);
		ops[op](cpu);
		WRITE_ONCE(ops_done[cpu], i + 1);
	}
	cli();
}

/* `dead_holder=1` (a regression test of tests/fuzz_guest.rs): CPU 1 takes the IOAPIC/PIC lock and stops with it
 * in `cli; hlt`, as an AP INITed inside its critical section would; every other CPU must still get through its
 * ops at the cost of SHARED_TRIES spins per skipped op. */
static void worker(void *arg)
{
	(void)arg;
	u32 cpu = this_cpu();
	if (dead_holder && cpu == 1 && try_lock_shared(cpu)) {
		WRITE_ONCE(started[cpu], 1);
		for (;;)
			__asm__ volatile("cli; hlt");
	}
	fuzz_loop(cpu);
}

/* Real mode `cli; hlt; jmp` at PARK_ADDR, and a real-mode IVT whose every entry points there. */
static void install_parking(void)
{
	static const u8 park[] = { 0xFA, 0xF4, 0xEB, 0xFD };
	memcpy((void *)PARK_ADDR, park, sizeof(park));
	u64 zero = 0;
	__asm__("" : "+r"(zero)); /* address 0 on purpose: keep the compiler from treating it as NULL */
	volatile u32 *ivt = (volatile u32 *)zero;
	for (u32 v = 0; v < 256; v++)
		ivt[v] = PARK_ADDR; /* segment 0, offset PARK_ADDR */
}

void guest_main(void)
{
	parse_cmdline();
	printf("FUZZ: seed %lu, %u CPU(s), %lu ops per CPU\n", seed, ncpus, ops_per_cpu);
	for (u32 c = 0; c < MAX_CPUS; c++)
		rng_state[c] = splitmix(seed ^ splitmix(((u64)ncpus << 32) | c)) | 1;
	platform_init(false);
	u32 online = smp_start_all();
	check(online == ncpus, "every CPU online", "%u of %u", online, ncpus);
	for (u32 v = 0x20; v < 0xFF; v++)
		irq_set_handler(v, fuzz_irq);
	irq_set_handler(SPURIOUS_VECTOR, spurious_irq);
	irq_set_handler(2, fuzz_nmi);
	install_parking();
	for (u32 c = 1; c < ncpus; c++)
		smp_call_async(c, worker, NULL);
	for (u32 c = 1; c < ncpus; c++)
		wait_nonzero(&started[c], WAIT_MS); /* the sequences overlap; a slow start is not a failure */
	u64 t0 = rdtsc();
	fuzz_loop(0);
	u64 t1 = rdtsc();
	WRITE_ONCE(stop_all, 1);
	delay_ms(100); /* the APs that still run see the stop flag; INITed or halted ones need not */
	for (u32 c = 0; c < ncpus; c++)
		printf("FUZZ: cpu %u: %lu ops, %lu faults caught, %lu interrupts, %lu ioapic/pic ops skipped, %lu lock spins\n",
		       c, ops_done[c], faults[c], irqs[c], shared_skipped[c], shared_spins[c]);
	if (READ_ONCE(shared_dev.locked))
		printf("FUZZ: the ioapic/pic lock is still held by cpu %u (it stopped inside its critical section)\n",
		       shared_holder);
	check(ops_done[0] == ops_per_cpu && t1 > t0, "heartbeat cpu ran every op", "%lu of %lu ops", ops_done[0],
	      ops_per_cpu);
}
