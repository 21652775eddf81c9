/* lib.c: the common library of the irqvm guest kernels (see guest.h for the API). */
#include <stdarg.h>
#include "guest.h"

u32 multiboot_magic, multiboot_info;
u8 cpu_stacks[MAX_CPUS][STACK_SIZE] __attribute__((aligned(4096)));

/* ---- memory helpers (gcc may emit calls to these) ---------------------------------------------------------- */
void *memset(void *d, int c, usize n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}
void *memcpy(void *d, const void *s, usize n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}
int memcmp(const void *a, const void *b, usize n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

/* ---- spinlocks ---------------------------------------------------------------------------------------------- */
void spin_lock(spinlock_t *l)
{
	while (atomic_xchg(&l->locked, 1))
		while (READ_ONCE(l->locked))
			cpu_relax();
}
void spin_unlock(spinlock_t *l)
{
	barrier();
	WRITE_ONCE(l->locked, 0);
}

/* ---- serial: 16550 at 0x3F8, polled ------------------------------------------------------------------------ */
#define COM1 0x3F8
void serial_init(void)
{
	outb(COM1 + 1, 0x00); /* IER: no interrupts */
	outb(COM1 + 3, 0x80); /* LCR: DLAB */
	outb(COM1 + 0, 0x01); /* divisor 1: 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8N1 */
	outb(COM1 + 2, 0xC7); /* FIFO on, cleared */
	outb(COM1 + 4, 0x03); /* DTR | RTS */
}
void putc_raw(char c)
{
	/* LSR bit 5: transmit holding register empty. Bounded: a missing UART must not hang the guest. */
	for (int i = 0; i < 1000 && !(inb(COM1 + 5) & 0x20); i++)
		cpu_relax();
	outb(COM1, (u8)c);
}

/* Output goes to the serial port, or into a buffer for snprintf. */
struct sink {
	char *buf;
	usize size, pos;
};
static void sink_put(struct sink *k, char c)
{
	if (!k || !k->buf) {
		putc_raw(c);
		return;
	}
	if (k->pos + 1 < k->size)
		k->buf[k->pos++] = c;
}
static void puts_raw(const char *s)
{
	while (*s)
		putc_raw(*s++);
}

/* ---- printf ------------------------------------------------------------------------------------------------- */
static spinlock_t print_lock;

static void put_num(struct sink *k, u64 v, u32 base, int width, char pad, bool neg)
{
	char buf[24];
	int n = 0;
	do {
		buf[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	if (neg)
		buf[n++] = '-';
	while (n < width--)
		sink_put(k, pad);
	while (n)
		sink_put(k, buf[--n]);
}

static void vformat(struct sink *k, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			sink_put(k, *fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, longs = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			longs++;
			fmt++;
		}
		switch (*fmt) {
		case 'd': {
			i64 v = longs ? va_arg(ap, i64) : va_arg(ap, int);
			put_num(k, v < 0 ? (u64)-v : (u64)v, 10, width, pad, v < 0);
			break;
		}
		case 'u':
			put_num(k, longs ? va_arg(ap, u64) : va_arg(ap, u32), 10, width, pad, false);
			break;
		case 'x':
			put_num(k, longs ? va_arg(ap, u64) : va_arg(ap, u32), 16, width, pad, false);
			break;
		case 'p':
			sink_put(k, '0');
			sink_put(k, 'x');
			put_num(k, (u64)va_arg(ap, void *), 16, width, pad, false);
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			for (s = s ? s : "(null)"; *s; s++)
				sink_put(k, *s);
			break;
		}
		case 'c':
			sink_put(k, (char)va_arg(ap, int));
			break;
		case '%':
			sink_put(k, '%');
			break;
		case 0:
			return;
		default:
			sink_put(k, '%');
			sink_put(k, *fmt);
		}
	}
}
static void vprint(const char *fmt, va_list ap) { vformat(NULL, fmt, ap); }

char *sfmt(char *buf, usize size, const char *fmt, ...)
{
	struct sink k = { buf, size, 0 };
	va_list ap;
	va_start(ap, fmt);
	vformat(&k, fmt, ap);
	va_end(ap);
	if (size)
		buf[k.pos] = 0;
	return buf;
}

/* Interrupts off while the lock is held, so an interrupt handler that prints cannot deadlock its own CPU.
 * The wait for the lock is bounded: a CPU that died holding it must not silence everybody else. */
static u64 print_begin(void)
{
	u64 flags = read_flags();
	cli();
	for (u32 i = 0; i < 20000000 && atomic_xchg(&print_lock.locked, 1); i++)
		cpu_relax();
	return flags;
}
static void print_end(u64 flags)
{
	spin_unlock(&print_lock);
	write_flags(flags);
}

void printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	u64 f = print_begin();
	vprint(fmt, ap);
	print_end(f);
	va_end(ap);
}

/* ---- checks and exit ---------------------------------------------------------------------------------------- */
u32 n_passed, n_failed;

void pass(const char *name)
{
	atomic_inc(&n_passed);
	printf("PASS: %s\n", name);
}
static void report(const char *kind, const char *name, const char *fmt, va_list ap)
{
	u64 f = print_begin();
	puts_raw(kind);
	puts_raw(name);
	puts_raw(": ");
	vprint(fmt, ap);
	putc_raw('\n');
	print_end(f);
}
void fail(const char *name, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	atomic_inc(&n_failed);
	report("FAIL: ", name, fmt, ap);
	va_end(ap);
}
void skip(const char *name, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	report("SKIP: ", name, fmt, ap);
	va_end(ap);
}
bool check(bool cond, const char *name, const char *fmt, ...)
{
	if (cond) {
		pass(name);
		return true;
	}
	va_list ap;
	va_start(ap, fmt);
	atomic_inc(&n_failed);
	report("FAIL: ", name, fmt, ap);
	va_end(ap);
	return false;
}
void exit_qemu(u32 code)
{
	outl(0xF4, code); /* isa-debug-exit: QEMU exits with (code << 1) | 1 */
	for (;;) {
		cli();
		__asm__ volatile("hlt");
	}
}
void done(void)
{
	printf("DONE: %u passed, %u failed\n", n_passed, n_failed);
	exit_qemu(n_failed ? 1 : 0);
}
void panic(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	atomic_inc(&n_failed);
	report("FAIL: ", "panic", fmt, ap);
	va_end(ap);
	done();
}

/* ---- time --------------------------------------------------------------------------------------------------- */
static u64 cached_tsc_khz;
u64 tsc_khz(void)
{
	if (cached_tsc_khz)
		return cached_tsc_khz;
	u32 a, b, c, d, max;
	u64 khz = 0;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d); /* TSC = crystal (ECX Hz) * EBX / EAX */
		if (a && b && c)
			khz = (u64)c * b / a / 1000;
	}
	if (!khz && max >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d); /* EAX: base frequency in MHz */
		if (a & 0xFFFF)
			khz = (u64)(a & 0xFFFF) * 1000;
	}
	if (!khz) {
		cpuid(0x40000000, 0, &a, &b, &c, &d);
		if (a >= 0x40000010 && a < 0x4000FFFF) {
			cpuid(0x40000010, 0, &a, &b, &c, &d); /* EAX: TSC frequency in kHz (hypervisor timing leaf) */
			khz = a;
		}
	}
	if (khz < 100000 || khz > 10000000)
		khz = 3000000; /* unknown: assume 3 GHz; the bounds are generous anyway */
	cached_tsc_khz = khz;
	return khz;
}
u64 ms_to_tsc(u64 ms) { return ms * tsc_khz(); }

/* Every wait is bounded by the TSC and, in case the TSC does not advance, by an iteration count. */
#define ITERS_PER_MS 100000ul
bool wait_until(bool (*fn)(void *), void *arg, u64 ms)
{
	u64 start = rdtsc(), limit = ms_to_tsc(ms), iters = ms * ITERS_PER_MS;
	for (u64 i = 0; i < iters; i++) {
		if (fn(arg))
			return true;
		if (rdtsc() - start > limit)
			break;
		cpu_relax();
	}
	return fn(arg);
}
static bool is_nonzero(void *p) { return READ_ONCE(*(volatile u32 *)p) != 0; }
bool wait_nonzero(volatile u32 *p, u64 ms) { return wait_until(is_nonzero, (void *)p, ms); }
struct cmp { volatile u32 *p; u32 v; };
static bool is_ge(void *a)
{
	struct cmp *c = a;
	return READ_ONCE(*c->p) >= c->v;
}
static bool is_eq(void *a)
{
	struct cmp *c = a;
	return READ_ONCE(*c->p) == c->v;
}
bool wait_ge(volatile u32 *p, u32 v, u64 ms)
{
	struct cmp c = { p, v };
	return wait_until(is_ge, &c, ms);
}
bool wait_eq(volatile u32 *p, u32 v, u64 ms)
{
	struct cmp c = { p, v };
	return wait_until(is_eq, &c, ms);
}
static bool never(void *unused) { (void)unused; return false; }
void delay_ms(u64 ms) { wait_until(never, NULL, ms); }
void delay_us(u64 us)
{
	u64 start = rdtsc(), limit = us * tsc_khz() / 1000;
	for (u64 i = 0; i < us * 100 + 1000 && rdtsc() - start < limit; i++)
		cpu_relax();
}

/* ---- fw_cfg ------------------------------------------------------------------------------------------------- */
#define FW_CFG_SEL 0x510
#define FW_CFG_DATA 0x511
void fwcfg_read(u16 key, void *buf, u32 len)
{
	u8 *p = buf;
	outw(FW_CFG_SEL, key);
	for (u32 i = 0; i < len; i++)
		p[i] = inb(FW_CFG_DATA);
}
bool fwcfg_present(void)
{
	char sig[4];
	fwcfg_read(0x0000, sig, 4);
	return memcmp(sig, "QEMU", 4) == 0;
}
u32 fwcfg_cpu_count(void)
{
	u16 n = 0;
	if (!fwcfg_present())
		return 1;
	fwcfg_read(0x0005, &n, 2);
	return n ? n : 1;
}
u64 fwcfg_ram_size(void)
{
	u64 n = 0;
	if (!fwcfg_present())
		return 0;
	fwcfg_read(0x0003, &n, 8);
	return n;
}

/* ---- IDT ---------------------------------------------------------------------------------------------------- */
struct idt_entry {
	u16 off_lo, sel;
	u8 ist, type;
	u16 off_mid;
	u32 off_hi, zero;
} __attribute__((packed));
static struct idt_entry idt[256] __attribute__((aligned(16)));
extern char isr_stubs[];
static irq_handler_t handlers[256];
volatile u32 irq_count[MAX_CPUS][256];
volatile u32 irq_last_vector[MAX_CPUS];

static void idt_build(void)
{
	for (int v = 0; v < 256; v++) {
		u64 a = (u64)isr_stubs + 16 * v;
		idt[v] = (struct idt_entry){ (u16)a, 0x18, 0, 0x8E, (u16)(a >> 16), (u32)(a >> 32), 0 };
	}
}
void idt_load(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) d = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(d));
}
/* Type 0x8E: present, 64-bit interrupt gate; DPL in bits 6:5 (SDM vol. 3 6.14.1). */
void idt_set_gate_dpl(u32 v, u32 dpl) { idt[v & 255].type = (u8)(0x8E | (dpl & 3) << 5); }
void irq_set_handler(u32 v, irq_handler_t h) { handlers[v & 255] = h; }
u32 irq_count_total(u32 v)
{
	u32 n = 0;
	for (u32 c = 0; c < ncpus; c++)
		n += irq_count[c][v & 255];
	return n;
}
void irq_count_snapshot(u32 v, u32 *out)
{
	for (u32 c = 0; c < ncpus; c++)
		out[c] = irq_count[c][v & 255];
}

/* A mask: CPUs 32 and up are not in it (the guests that use it run on at most 4). */
u32 irq_took_mask(u32 v, const u32 *before)
{
	u32 took = 0;
	for (u32 c = 0; c < ncpus && c < 32; c++)
		took |= (u32)(irq_count[c][v & 255] != before[c]) << c;
	return took;
}

/* Only the CPUs that exist: guest ring-0 code is slow on emulating hosts, and the array is 1 MiB at 1024 CPUs. */
void irq_reset_counts(void) { memset((void *)irq_count, 0, ncpus * sizeof(irq_count[0])); }

/* rdmsr_catch / wrmsr_catch: while a CPU has a catch armed, a fault raised by an RDMSR (0F 32) or WRMSR (0F 30)
 * is recorded and the instruction skipped instead of reaching the handler table. Only the faults these
 * instructions raise count (SDM vol. 2B, RDMSR/WRMSR: #GP(0), #UD): an NMI or an interrupt taken with RIP at the
 * instruction, before it ran, is not its fault and must not skip it. A catch nests: an NMI or interrupt handler
 * that uses one in between the arming and the instruction (a handler's x2APIC EOI by wrmsr_catch) leaves the
 * interrupted catch armed, as it found it. */
static volatile u32 msr_catch_armed[MAX_CPUS], msr_caught[MAX_CPUS];
static bool msr_fault_caught(struct irq_frame *f, u32 cpu, u32 v)
{
	if ((v != 13 && v != 6) || !msr_catch_armed[cpu])
		return false;
	const volatile u8 *ip = (const volatile u8 *)f->rip;
	if (ip[0] != 0x0F || (ip[1] != 0x30 && ip[1] != 0x32))
		return false;
	msr_caught[cpu] = v + 1;
	f->rip += 2;
	return true;
}
struct msr_catch {
	u32 cpu, outer_armed, outer_caught;
};
static struct msr_catch msr_catch_arm(void)
{
	u32 cpu = this_cpu();
	struct msr_catch c = { cpu, msr_catch_armed[cpu], msr_caught[cpu] };
	msr_caught[cpu] = 0;
	WRITE_ONCE(msr_catch_armed[cpu], 1);
	return c;
}
/* The vector + 1 of the fault caught since msr_catch_arm (0: none); the interrupted catch's state back. */
static u32 msr_catch_disarm(struct msr_catch c)
{
	u32 caught = READ_ONCE(msr_caught[c.cpu]);
	WRITE_ONCE(msr_catch_armed[c.cpu], c.outer_armed);
	msr_caught[c.cpu] = c.outer_caught;
	return caught;
}
u32 rdmsr_catch(u32 msr, u64 *val)
{
	u32 lo = 0, hi = 0;
	struct msr_catch c = msr_catch_arm();
	__asm__ volatile("rdmsr" : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
	u32 caught = msr_catch_disarm(c);
	*val = ((u64)hi << 32) | lo;
	return caught;
}
u32 wrmsr_catch(u32 msr, u64 v)
{
	struct msr_catch c = msr_catch_arm();
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
	return msr_catch_disarm(c);
}

void isr_dispatch(struct irq_frame *f)
{
	u32 cpu = this_cpu(), v = (u32)f->vector & 255;
	irq_count[cpu][v]++;
	irq_last_vector[cpu] = v;
	if (msr_fault_caught(f, cpu, v)) {
		return;
	} else if (handlers[v]) {
		handlers[v](f, cpu);
	} else if (v < 32 && v != 2) {
		panic("exception %u on CPU %u, error %lx, rip %lx", v, cpu, f->error, f->rip);
	} else if (v >= 32 && v != SPURIOUS_VECTOR) {
		apic_eoi();
	}
}

/* ---- local APIC ------------------------------------------------------------------------------------------- */
#define XAPIC_MMIO 0xFEE00000ul
bool apic_x2;
bool cpu_has_x2apic(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	return (c >> 21) & 1;
}
bool cpu_has_tsc_deadline(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	return (c >> 24) & 1;
}
bool cpu_has_kvm_pv_eoi(void)
{
	u32 a, b, c, d;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d || a < 0x40000001) /* "KVMKVMKVM\0\0\0" */
		return false;
	cpuid(0x40000001, 0, &a, &b, &c, &d);
	return (a & (1u << 6)) != 0;
}
void pv_eoi_enable(volatile u32 *word)
{
	if (word)
		*word = 0;
	wrmsr(MSR_KVM_PV_EOI_EN, word ? ((u64)(usize)word | 1) : 0);
}
bool apic_use_x2apic(bool on)
{
	apic_x2 = on && cpu_has_x2apic();
	return apic_x2 == on;
}
u32 apic_read(u32 reg)
{
	if (apic_x2)
		return (u32)rdmsr(0x800 + (reg >> 4));
	return *(volatile u32 *)(XAPIC_MMIO + reg);
}
void apic_write(u32 reg, u32 val)
{
	if (apic_x2)
		wrmsr(0x800 + (reg >> 4), val);
	else
		*(volatile u32 *)(XAPIC_MMIO + reg) = val;
}
u32 apic_id(void) { return apic_x2 ? apic_read(APIC_ID) : apic_read(APIC_ID) >> 24; }
void apic_eoi(void) { apic_write(APIC_EOI, 0); }
bool apic_vector_bit(u32 base, u32 v) { return (apic_read(base + 0x10 * ((v & 255) / 32)) >> (v % 32)) & 1; }

void apic_enable(void)
{
	u64 base = rdmsr(APIC_BASE_MSR);
	if (apic_x2) {
		if (!(base & APIC_BASE_EN))
			wrmsr(APIC_BASE_MSR, base | APIC_BASE_EN);
		wrmsr(APIC_BASE_MSR, base | APIC_BASE_EN | APIC_BASE_EXTD);
	} else {
		if (base & APIC_BASE_EXTD) /* x2APIC -> xAPIC is only legal through the disabled state (SDM 11.12.5) */
			wrmsr(APIC_BASE_MSR, base & ~(u64)(APIC_BASE_EN | APIC_BASE_EXTD));
		wrmsr(APIC_BASE_MSR, (base & ~(u64)APIC_BASE_EXTD) | APIC_BASE_EN);
	}
	apic_write(APIC_SVR, 0x100 | SPURIOUS_VECTOR);
	apic_write(APIC_TPR, 0);
	apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	apic_write(APIC_LVT_LINT0, APIC_LVT_MASKED);
	apic_write(APIC_LVT_LINT1, APIC_LVT_MASKED);
	apic_write(APIC_LVT_ERROR, APIC_LVT_MASKED);
}

bool apic_icr_write(u32 dest, u32 lo)
{
	u64 flags = read_flags();
	cli();
	bool ok = true;
	if (apic_x2) {
		wrmsr(0x830, ((u64)dest << 32) | lo);
	} else {
		apic_write(APIC_ICR2, dest << 24);
		apic_write(APIC_ICR, lo);
		u32 i;
		for (i = 0; i < 1000000 && (apic_read(APIC_ICR) & APIC_ICR_BUSY); i++)
			cpu_relax();
		ok = i < 1000000;
	}
	write_flags(flags);
	return ok;
}

/* ---- IOAPIC ----------------------------------------------------------------------------------------------- */
#define IOAPIC_MMIO 0xFEC00000ul
u32 ioapic_read(u32 reg)
{
	*(volatile u32 *)IOAPIC_MMIO = reg;
	return *(volatile u32 *)(IOAPIC_MMIO + 0x10);
}
void ioapic_write(u32 reg, u32 val)
{
	*(volatile u32 *)IOAPIC_MMIO = reg;
	*(volatile u32 *)(IOAPIC_MMIO + 0x10) = val;
}
u64 ioapic_get_entry(u32 pin)
{
	u32 lo = ioapic_read(IOAPIC_REDTBL(pin));
	return ((u64)ioapic_read(IOAPIC_REDTBL(pin) + 1) << 32) | lo;
}
void ioapic_set_entry(u32 pin, u64 e)
{
	ioapic_write(IOAPIC_REDTBL(pin) + 1, (u32)(e >> 32));
	ioapic_write(IOAPIC_REDTBL(pin), (u32)e);
}
/* The IOxAPIC EOI register (version 20H, SDM vol. 3 §11.8.5): clears remote IRR of every entry with
 * this vector, as a broadcast EOI would. */
void ioapic_eoi(u8 vector) { *(volatile u32 *)(IOAPIC_MMIO + 0x40) = vector; }
u32 ioapic_pin_count(void) { return ((ioapic_read(IOAPIC_VER) >> 16) & 0xFF) + 1; }
void ioapic_mask_all(void)
{
	u32 n = ioapic_pin_count();
	for (u32 p = 0; p < n && p < 64; p++)
		ioapic_write(IOAPIC_REDTBL(p), IOAPIC_MASKED);
}

/* ---- 8259 PIC ---------------------------------------------------------------------------------------------- */
void pic_init(u8 mbase, u8 sbase)
{
	outb(0x20, 0x11); /* ICW1: edge, cascade, ICW4 follows */
	outb(0xA0, 0x11);
	outb(0x21, mbase); /* ICW2: vector base */
	outb(0xA1, sbase);
	outb(0x21, 0x04); /* ICW3: slave on IRQ2 */
	outb(0xA1, 0x02); /* ICW3: slave identity 2 */
	outb(0x21, 0x01); /* ICW4: 8086 mode, normal EOI */
	outb(0xA1, 0x01);
	pic_set_mask(0xFFFF);
}
void pic_set_mask(u16 m)
{
	outb(0x21, (u8)m);
	outb(0xA1, (u8)(m >> 8));
}
u16 pic_get_mask(void) { return inb(0x21) | (u16)inb(0xA1) << 8; }
void pic_eoi(u32 irq)
{
	if (irq >= 8) {
		outb(0xA0, 0x60 | (irq & 7)); /* OCW2 specific EOI */
		outb(0x20, 0x62);
	} else {
		outb(0x20, 0x60 | (irq & 7));
	}
}
static u16 pic_read_ocw3(u8 ocw3)
{
	outb(0x20, ocw3);
	outb(0xA0, ocw3);
	return inb(0x20) | (u16)inb(0xA0) << 8;
}
u16 pic_read_irr(void) { return pic_read_ocw3(0x0A); }
u16 pic_read_isr(void)
{
	u16 v = pic_read_ocw3(0x0B);
	pic_read_ocw3(0x0A); /* back to reading IRR, the power-on default */
	return v;
}
void pic_disable(void) { pic_init(0x20, 0x28); }

/* ---- SMP -------------------------------------------------------------------------------------------------- */
u32 ncpus = 1;
volatile u32 cpu_online[MAX_CPUS];
volatile u32 cpu_apic_id[MAX_CPUS];
volatile u32 cpu_boot_count[MAX_CPUS];
volatile u32 cpu_parked[MAX_CPUS];
volatile u32 cpu_enum_id[MAX_CPUS];
u32 madt_cpus, fwcfg_cpus = 1;
volatile u64 ap_boot_stack;
volatile u32 ap_boot_cpu;
/* Read by the trampoline's 64-bit part (entry.S): broadcast start-up on, the ticket counter, the CPU limit. */
volatile u32 ap_broadcast, ap_tickets;
static volatile u32 broadcast_online; /* APs online since the broadcast start-up began */
const u32 ap_max_cpus = MAX_CPUS;
u32 smp_init_delay_us = 10000, smp_sipi_delay_us = 200;
void (*ap_arrival_hook)(u32 cpu);
extern char trampoline_start[], trampoline_end[];

struct mailbox {
	void (*volatile fn)(void *);
	void *volatile arg;
	volatile u32 req, ack;
};
static struct mailbox mailboxes[MAX_CPUS];

u32 this_cpu(void)
{
	u64 sp;
	__asm__ volatile("movq %%rsp, %0" : "=r"(sp));
	u64 i = (sp - (u64)cpu_stacks) / STACK_SIZE;
	return i < MAX_CPUS ? (u32)i : 0;
}

static void kick_handler(struct irq_frame *f, u32 cpu)
{
	(void)f;
	(void)cpu;
	apic_eoi();
}

void ap_main(u32 cpu)
{
	idt_load();
	apic_enable();
	cpu_apic_id[cpu] = apic_id();
	atomic_inc(&cpu_boot_count[cpu]);
	struct mailbox *m = &mailboxes[cpu];
	m->ack = m->req; /* a call pending from before an INIT is dropped */
	cpu_parked[cpu] = 0;
	if (ap_arrival_hook)
		ap_arrival_hook(cpu);
	barrier();
	WRITE_ONCE(cpu_online[cpu], 1);
	if (READ_ONCE(ap_broadcast))
		atomic_inc(&broadcast_online);
	for (;;) {
		cli();
		u32 r = READ_ONCE(m->req);
		if (r != m->ack) {
			void (*fn)(void *) = m->fn;
			void *arg = m->arg;
			sti();
			fn(arg);
			barrier();
			WRITE_ONCE(m->ack, r);
		} else {
			sti_hlt();
		}
	}
}

void smp_park_cli_hlt(void *unused)
{
	(void)unused;
	cli();
	WRITE_ONCE(cpu_parked[this_cpu()], 1);
	for (;;)
		__asm__ volatile("cli; hlt");
}

bool smp_call_async(u32 cpu, void (*fn)(void *), void *arg)
{
	if (cpu >= MAX_CPUS || !cpu_online[cpu])
		return false;
	struct mailbox *m = &mailboxes[cpu];
	if (m->req != m->ack)
		return false;
	m->fn = fn;
	m->arg = arg;
	barrier();
	WRITE_ONCE(m->req, m->req + 1);
	return apic_icr_write(cpu_to_apic_id(cpu), KICK_VECTOR);
}
bool smp_wait(u32 cpu, u64 ms)
{
	struct mailbox *m = &mailboxes[cpu];
	return wait_eq(&m->ack, m->req, ms);
}
bool smp_call(u32 cpu, void (*fn)(void *), void *arg) { return smp_call_async(cpu, fn, arg) && smp_wait(cpu, WAIT_MS); }

void smp_send_init(u32 cpu)
{
	WRITE_ONCE(cpu_online[cpu], 0);
	apic_icr_write(cpu_to_apic_id(cpu), APIC_DM_INIT | APIC_LEVEL_ASSERT);
}
void smp_send_sipis(u32 cpu)
{
	memcpy((void *)TRAMPOLINE_ADDR, trampoline_start, trampoline_end - trampoline_start);
	ap_boot_cpu = cpu;
	ap_boot_stack = (u64)&cpu_stacks[cpu][STACK_SIZE];
	barrier();
	u32 id = cpu_to_apic_id(cpu);
	apic_icr_write(id, APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12));
	delay_us(smp_sipi_delay_us);
	apic_icr_write(id, APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12)); /* ignored if the AP already left wait-for-SIPI */
	delay_us(smp_sipi_delay_us);
}
bool smp_start_ap(u32 cpu)
{
	if (cpu == 0 || cpu >= MAX_CPUS)
		return false;
	/* SDM vol. 3, "MP initialization" (universal start-up): INIT, 10 ms, SIPI, 200 us, SIPI, 200 us. */
	smp_send_init(cpu);
	delay_us(smp_init_delay_us);
	smp_send_sipis(cpu);
	return wait_nonzero(&cpu_online[cpu], WAIT_MS);
}

static bool all_aps_online(void *arg)
{
	(void)arg;
	return READ_ONCE(broadcast_online) >= ncpus - 1;
}
u32 smp_start_all_broadcast(u64 ms)
{
	memcpy((void *)TRAMPOLINE_ADDR, trampoline_start, trampoline_end - trampoline_start);
	for (u32 c = 1; c < ncpus; c++)
		WRITE_ONCE(cpu_online[c], 0);
	WRITE_ONCE(broadcast_online, 0);
	WRITE_ONCE(ap_tickets, 0);
	WRITE_ONCE(ap_broadcast, 1);
	barrier();
	apic_icr_write(0, APIC_SH_OTHERS | APIC_DM_INIT | APIC_LEVEL_ASSERT);
	delay_us(smp_init_delay_us);
	apic_icr_write(0, APIC_SH_OTHERS | APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12));
	delay_us(smp_sipi_delay_us);
	apic_icr_write(0, APIC_SH_OTHERS | APIC_DM_STARTUP | (TRAMPOLINE_ADDR >> 12));
	delay_us(smp_sipi_delay_us);
	wait_until(all_aps_online, NULL, ms);
	WRITE_ONCE(ap_broadcast, 0);
	u32 n = 1;
	for (u32 c = 1; c < ncpus; c++)
		if (READ_ONCE(cpu_online[c])) {
			cpu_enum_id[c] = cpu_apic_id[c];
			n++;
		}
	return n;
}

/* ---- CPU enumeration from the ACPI MADT (ACPI 6.5 §5.2.5 RSDP, §5.2.7 RSDT, §5.2.8 XSDT, §5.2.12 MADT) ---- */
static bool acpi_sum_ok(const u8 *p, u32 len)
{
	u8 sum = 0;
	for (u32 i = 0; i < len; i++)
		sum += p[i];
	return sum == 0;
}
static const u8 *find_rsdp(void)
{
	for (u64 a = 0xE0000; a < 0x100000; a += 16) {
		const u8 *p = (const u8 *)a;
		if (!memcmp(p, "RSD PTR ", 8) && acpi_sum_ok(p, 20))
			return p;
	}
	return NULL;
}
/* The table with `sig` that the root table at `root` lists with `width`-byte entries (8: XSDT, 4: RSDT), or
 * NULL. Tables must sit below 4 GiB (the guests map only that). */
static const u8 *find_in_root(u64 root, const char *root_sig, u32 width, const char *sig)
{
	if (!root || root >= (1ul << 32))
		return NULL;
	const u8 *sdt = (const u8 *)root;
	u32 len = *(const u32 *)(sdt + 4);
	if (memcmp(sdt, root_sig, 4) || len < 36 || !acpi_sum_ok(sdt, len))
		return NULL;
	for (u32 off = 36; off + width <= len; off += width) {
		u64 t = width == 8 ? *(const u64 *)(sdt + off) : *(const u32 *)(sdt + off);
		if (t && t < (1ul << 32) && !memcmp((const u8 *)t, sig, 4))
			return (const u8 *)t;
	}
	return NULL;
}
/* The table with `sig` that the RSDP's XSDT (revision 2+) or RSDT lists, or NULL. */
static const u8 *find_acpi_table(const char *sig)
{
	const u8 *rsdp = find_rsdp();
	if (!rsdp)
		return NULL;
	if (rsdp[15] >= 2)
		return find_in_root(*(const u64 *)(rsdp + 24), "XSDT", 8, sig);
	return find_in_root(*(const u32 *)(rsdp + 16), "RSDT", 4, sig);
}
bool acpi_rsdt_agrees(void)
{
	const u8 *rsdp = find_rsdp();
	if (!rsdp)
		return false;
	u64 rsdt = *(const u32 *)(rsdp + 16);
	static const char *const sigs[] = { "FACP", "APIC" };
	for (u32 i = 0; i < 2; i++) {
		const u8 *via_rsdt = find_in_root(rsdt, "RSDT", 4, sigs[i]);
		if (!via_rsdt || via_rsdt != find_acpi_table(sigs[i]))
			return false;
	}
	return true;
}
/* This CPU's initial APIC ID: CPUID 0BH EDX (32 bits) if the leaf exists, else CPUID 1 EBX[31:24]. */
static u32 initial_apic_id(void)
{
	u32 max, b, c, d, a;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0xB) {
		cpuid(0xB, 0, &a, &b, &c, &d);
		if (b & 0xFFFF)
			return d;
	}
	cpuid(1, 0, &a, &b, &c, &d);
	return b >> 24;
}
static void enumerate_cpus(void)
{
	const u8 *madt = find_acpi_table("APIC");
	u32 n = 0;
	if (madt) {
		u32 len = *(const u32 *)(madt + 4);
		for (u32 off = 44; off + 2 <= len && madt[off + 1] >= 2; off += madt[off + 1]) {
			const u8 *e = madt + off;
			u32 id, enabled;
			if (e[0] == 0 && e[1] >= 8) { /* Processor Local APIC: UID, 8-bit ID, flags */
				id = e[3];
				enabled = *(const u32 *)(e + 4) & 1;
			} else if (e[0] == 9 && e[1] >= 16) { /* Processor Local x2APIC: 32-bit ID, flags, UID */
				id = *(const u32 *)(e + 4);
				enabled = *(const u32 *)(e + 8) & 1;
			} else {
				continue;
			}
			if (!enabled)
				continue;
			if (n < MAX_CPUS)
				cpu_enum_id[n] = id;
			n++;
		}
	}
	madt_cpus = n;
	fwcfg_cpus = fwcfg_cpu_count();
	ncpus = n ? n : fwcfg_cpus;
	if (ncpus > MAX_CPUS)
		ncpus = MAX_CPUS;
	if (!n) {
		for (u32 c = 0; c < ncpus; c++)
			cpu_enum_id[c] = c;
		return;
	}
	u32 bsp = initial_apic_id();
	for (u32 c = 1; c < ncpus; c++)
		if (cpu_enum_id[c] == bsp) {
			cpu_enum_id[c] = cpu_enum_id[0];
			cpu_enum_id[0] = bsp;
		}
}

u32 smp_start_all(void)
{
	u32 n = 1;
	for (u32 c = 1; c < ncpus; c++)
		n += smp_start_ap(c);
	return n;
}

void platform_init(bool x2apic)
{
	pic_disable();
	ioapic_mask_all();
	apic_use_x2apic(x2apic);
	apic_enable();
	cpu_apic_id[0] = apic_id();
	sti();
}

/* ---- multiboot command line -------------------------------------------------------------------------------- */
u64 cmdline_u64(const char *key, u64 dflt)
{
	const u32 *info = (const u32 *)(u64)multiboot_info;
	if (!info || !(info[0] & (1u << 2))) /* flags bit 2: cmdline valid (multiboot v1 spec, 3.3) */
		return dflt;
	usize n = 0;
	while (key[n])
		n++;
	const char *p = (const char *)(u64)info[4];
	for (const char *t = p; *t; t++) {
		if ((t != p && t[-1] != ' ') || memcmp(t, key, n) || t[n] != '=' || t[n + 1] < '0' || t[n + 1] > '9')
			continue;
		u64 v = 0;
		for (t += n + 1; *t >= '0' && *t <= '9'; t++)
			v = v * 10 + (u64)(*t - '0');
		return v;
	}
	return dflt;
}

/* ---- BSP entry (from entry.S) ------------------------------------------------------------------------------- */
void bsp_main(void)
{
	serial_init();
	idt_build();
	idt_load();
	irq_set_handler(KICK_VECTOR, kick_handler);
	enumerate_cpus();
	cpu_online[0] = 1;
	cpu_boot_count[0] = 1;
	guest_main();
	done();
}

/* Puts an available 64-bit TSS descriptor for `tss` (104 bytes, present, DPL 0; type 9, SDM vol. 3 8.2.3) in
 * gdt[slot] and gdt[slot + 1], loads the GDT (`entries` descriptors) and the task register with selector
 * slot * 8. */
void load_gdt_with_tss(u64 *gdt, u32 entries, u32 slot, const void *tss)
{
	u64 base = (u64)tss, limit = 104 - 1;
	gdt[slot] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ul << 40) | (((limit >> 16) & 0xF) << 48) |
		    (((base >> 24) & 0xFF) << 56);
	gdt[slot + 1] = base >> 32;
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) d = { (u16)(entries * 8 - 1), (u64)gdt };
	__asm__ volatile("lgdt %0" : : "m"(d) : "memory");
	__asm__ volatile("ltr %w0" : : "r"((u16)(slot * 8)) : "memory");
}
