/* guest.h: the common library of the irqvm guest test kernels.
 *
 * Every guest is a multiboot v1 kernel that starts in 32-bit protected mode, switches to 64-bit long mode
 * (lib/entry.S) and calls `void guest_main(void)` on the bootstrap processor (CPU 0).  Output protocol:
 *   PASS: <check>            FAIL: <check>: <detail>            SKIP: <check>: <why>
 *   DONE: <n> passed, <m> failed      then a 32-bit write to port 0xF4 (0 = all passed, 1 = failures).
 */
#ifndef IRQVM_GUEST_H
#define IRQVM_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef int i32;
typedef unsigned long usize;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

/* Per-CPU arrays are MAX_CPUS long. The Makefile builds a second copy of the library with -DMAX_CPUS=1024
 * (KVM's vCPU limit) for the guests in its BIG_GUESTS list; loops run to ncpus, not MAX_CPUS. */
#ifndef MAX_CPUS
#define MAX_CPUS 16
#endif
#define STACK_SIZE 16384

/* ---- the test itself --------------------------------------------------------------------------------------- */
void guest_main(void);            /* provided by each guest, runs on CPU 0 */

/* ---- port I/O, MSRs, CPUID, TSC (inline) ------------------------------------------------------------------- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
/* RDMSR / WRMSR that survive an exception (#GP for a reserved MSR, a reserved bit or an illegal
 * IA32_APIC_BASE transition): the library's exception path steps over the 2-byte instruction. They return
 * 0 if the instruction completed, else the vector taken + 1 (14 for #GP); rdmsr_catch stores 0 on a fault. */
u32 rdmsr_catch(u32 msr, u64 *val);
u32 wrmsr_catch(u32 msr, u64 v);
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
/* `sti; hlt`: the STI shadow makes the pair atomic, so an interrupt that became pending before cannot be lost. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
/* `sti; nop; cli`: opens an interrupt window of one instruction. */
static inline void sti_nop_cli(void) { __asm__ volatile("sti; nop; cli" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline u64 read_flags(void) { u64 f; __asm__ volatile("pushfq; popq %0" : "=r"(f)); return f; }
static inline void write_flags(u64 f) { __asm__ volatile("pushq %0; popfq" : : "r"(f) : "memory", "cc"); }
#define READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* ---- atomics and spinlocks (explicit lock xadd / xchg) ----------------------------------------------------- */
static inline u32 atomic_fetch_add(volatile u32 *p, u32 v)
{
	__asm__ volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p) : : "memory");
	return v;
}
static inline u32 atomic_xchg(volatile u32 *p, u32 v)
{
	__asm__ volatile("xchgl %0, %1" : "+r"(v), "+m"(*p) : : "memory"); /* xchg with memory is locked */
	return v;
}
static inline void atomic_inc(volatile u32 *p) { atomic_fetch_add(p, 1); }
typedef struct { volatile u32 locked; } spinlock_t;
void spin_lock(spinlock_t *l);
void spin_unlock(spinlock_t *l);

/* ---- output and checks ------------------------------------------------------------------------------------- */
void serial_init(void);
void putc_raw(char c);
/* printf subset: %d %u %x %s %c %p, modifiers l/ll, zero padding and width ("%08x"). Lines are atomic
 * across CPUs (global lock, interrupts off while printing). Never call from an NMI handler. */
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Formats into buf (always NUL-terminated, truncated to size) and returns buf: for check names like "cpu 3 online". */
char *sfmt(char *buf, usize size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void pass(const char *check);
void fail(const char *check, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void skip(const char *check, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* check(cond, name, detail...): PASS if cond, else FAIL with the detail. Returns cond. */
bool check(bool cond, const char *check, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void done(void) __attribute__((noreturn));            /* prints DONE and exits 0/1 */
void exit_qemu(u32 code) __attribute__((noreturn));   /* isa-debug-exit port 0xF4, then cli;hlt forever */
void panic(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));  /* FAIL: panic + exit 1 */
extern u32 n_passed, n_failed;

void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);

/* ---- time and bounded waits -------------------------------------------------------------------------------- */
u64 tsc_khz(void);                 /* estimate: CPUID 0x15/0x16, hypervisor leaf 0x40000010, else 3 GHz */
u64 ms_to_tsc(u64 ms);
/* Spin (with pause) until *p != 0 or `ms` milliseconds pass (TSC, with an iteration cap as a backstop in case
 * the TSC does not advance).  Returns true if the condition became true. */
bool wait_nonzero(volatile u32 *p, u64 ms);
bool wait_ge(volatile u32 *p, u32 value, u64 ms);
bool wait_eq(volatile u32 *p, u32 value, u64 ms);
/* Generic form: wait until fn(arg) returns true. */
bool wait_until(bool (*fn)(void *), void *arg, u64 ms);
void delay_ms(u64 ms);             /* busy wait by TSC (bounded by iterations too) */
#define WAIT_MS 3000               /* default generous bound for "should happen" waits */

/* ---- fw_cfg (legacy I/O: selector 0x510, data 0x511) -------------------------------------------------------- */
bool fwcfg_present(void);          /* signature "QEMU" at key 0 */
void fwcfg_read(u16 key, void *buf, u32 len);
u32 fwcfg_cpu_count(void);         /* key 0x05 (u16 LE); 1 if fw_cfg is absent */
u64 fwcfg_ram_size(void);          /* key 0x03 (u64 LE); 0 if absent */

/* ---- devices ------------------------------------------------------------------------------------------------ */
static inline void testdev_set_irq(u32 line, bool level) { outb(0x2000 + line, level ? 1 : 0); } /* pc-testdev */

/* ---- IDT and interrupt hooks -------------------------------------------------------------------------------- */
struct irq_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error, rip, cs, rflags, rsp, ss;
};
typedef void (*irq_handler_t)(struct irq_frame *f, u32 cpu);
/* The handler for `vector` (all CPUs). A handler owns the EOI; vectors >= 32 without a handler are counted and
 * EOI'd automatically (except the spurious vector 0xFF); exceptions without a handler are fatal (FAIL + exit). */
void irq_set_handler(u32 vector, irq_handler_t h);
extern volatile u32 irq_count[MAX_CPUS][256];   /* per CPU, per vector: times the vector was taken */
extern volatile u32 irq_last_vector[MAX_CPUS];
u32 irq_count_total(u32 vector);                /* sum over CPUs */
void irq_count_snapshot(u32 vector, u32 *out);  /* out[c] = irq_count[c][vector] for every CPU */
u32 irq_took_mask(u32 vector, const u32 *before); /* bit c set: CPU c took `vector` since the snapshot */
void irq_reset_counts(void);
void idt_load(void);                            /* loads the shared IDT on this CPU (done by the library) */
/* Sets the DPL of `vector`'s gate (0 by default): 3 lets CPL-3 code reach it with INT n (SDM vol. 3 6.12.1.1). */
void idt_set_gate_dpl(u32 vector, u32 dpl);
#define SPURIOUS_VECTOR 0xFF
#define KICK_VECTOR 0xF0                        /* used by smp_call() to wake idle APs */

/* ---- local APIC: one interface for xAPIC (MMIO at 0xFEE00000) and x2APIC (MSRs 0x800+reg/16) ----------------- */
#define APIC_BASE_MSR 0x1B
#define APIC_BASE_BSP (1u << 8)
#define APIC_BASE_EXTD (1u << 10)
#define APIC_BASE_EN (1u << 11)
#define APIC_ID 0x20
#define APIC_VERSION 0x30
#define APIC_TPR 0x80
#define APIC_APR 0x90
#define APIC_PPR 0xA0
#define APIC_EOI 0xB0
#define APIC_LDR 0xD0
#define APIC_DFR 0xE0
#define APIC_SVR 0xF0
#define APIC_SVR_SUPPRESS_EOI_BROADCAST 0x1000 /* SVR bit 12 (SDM vol. 3 §11.9), offered when APIC version bit 24 is set */
#define APIC_ISR 0x100          /* 8 registers, 0x100 + 0x10*i */
#define APIC_TMR 0x180
#define APIC_IRR 0x200
#define APIC_ESR 0x280
#define APIC_ICR 0x300
#define APIC_ICR2 0x310
#define APIC_LVT_TIMER 0x320
#define APIC_LVT_THERMAL 0x330
#define APIC_LVT_PERF 0x340
#define APIC_LVT_LINT0 0x350
#define APIC_LVT_LINT1 0x360
#define APIC_LVT_ERROR 0x370
#define APIC_TMICT 0x380
#define APIC_TMCCT 0x390
#define APIC_TDCR 0x3E0
#define APIC_SELF_IPI 0x3F0     /* x2APIC only */
/* ICR / LVT bits */
#define APIC_DM_FIXED 0x000
#define APIC_DM_LOWEST 0x100
#define APIC_DM_SMI 0x200
#define APIC_DM_NMI 0x400
#define APIC_DM_INIT 0x500
#define APIC_DM_STARTUP 0x600
#define APIC_DM_EXTINT 0x700
#define APIC_DEST_LOGICAL 0x800
#define APIC_ICR_BUSY 0x1000
#define APIC_LEVEL_ASSERT 0x4000
#define APIC_TRIGGER_LEVEL 0x8000
#define APIC_LVT_MASKED 0x10000
#define APIC_TIMER_ONESHOT 0x00000
#define APIC_TIMER_PERIODIC 0x20000
#define APIC_TIMER_TSCDEADLINE 0x40000
#define APIC_SH_SELF 0x40000
#define APIC_SH_ALL 0x80000
#define APIC_SH_OTHERS 0xC0000
#define MSR_TSC_DEADLINE 0x6E0

bool cpu_has_x2apic(void);         /* CPUID.1:ECX[21] */
bool cpu_has_tsc_deadline(void);   /* CPUID.1:ECX[24] */
/* KVM's paravirtual EOI (Linux Documentation/virt/kvm/x86/msr.rst, cpuid.rst): the KVM signature at CPUID
 * 0x40000000 and KVM_FEATURE_PV_EOI (0x40000001 EAX bit 6). */
#define MSR_KVM_PV_EOI_EN 0x4b564d04
bool cpu_has_kvm_pv_eoi(void);
/* This CPU's PV EOI word: `word` (4-byte aligned; the guests run identity-mapped, so its address is its
 * guest-physical one) zeroed and enabled, or PV EOI off with NULL. */
void pv_eoi_enable(volatile u32 *word);
/* An interrupt handler's EOI through its PV EOI word: bit 0 cleared by one instruction that says whether it
 * was set (the ABI's rule); true then, and the hypervisor retires the interrupt. False: the handler must
 * write the EOI register. */
static inline bool pv_eoi_take(volatile u32 *word)
{
	u8 was_set;
	__asm__ volatile("btrl $0, %0; setc %1" : "+m"(*word), "=q"(was_set) : : "memory", "cc");
	return was_set != 0;
}
/* Choose the mode for every CPU (call before smp_init; the APs follow). Returns false if x2APIC is asked for
 * but CPUID lacks it (the mode then stays xAPIC). */
bool apic_use_x2apic(bool on);
extern bool apic_x2;               /* current mode */
void apic_enable(void);            /* this CPU: mode per apic_x2, SVR = enable | 0xFF, TPR 0, LVTs masked */
u32 apic_read(u32 reg);
void apic_write(u32 reg, u32 val);
u32 apic_id(void);                 /* xAPIC: ID[31:24]; x2APIC: 32-bit ID */
void apic_eoi(void);
/* Send an IPI: `dest` is an APIC ID (physical) or a logical destination; `lo` is ICR[31:0] (vector, delivery
 * mode, dest mode, level, trigger, shorthand). xAPIC: writes ICR2 then ICR and waits (bounded) for the
 * delivery-status bit to clear; x2APIC: one 64-bit WRMSR. Returns false if the ICR stayed busy. */
bool apic_icr_write(u32 dest, u32 lo);
static inline bool apic_send_fixed(u32 dest_apic_id, u32 vector) { return apic_icr_write(dest_apic_id, vector); }
/* Bit `vector` of the 256-bit IRR / ISR / TMR register arrays (base = APIC_IRR, APIC_ISR or APIC_TMR). */
bool apic_vector_bit(u32 base, u32 vector);

/* ---- IOAPIC (MMIO 0xFEC00000: IOREGSEL at +0, IOWIN at +0x10) ----------------------------------------------- */
#define IOAPIC_ID 0x00
#define IOAPIC_VER 0x01
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define IOAPIC_MASKED (1ul << 16)
#define IOAPIC_LEVEL (1ul << 15)
#define IOAPIC_REMOTE_IRR (1ul << 14)
#define IOAPIC_ACTIVE_LOW (1ul << 13)
#define IOAPIC_DELIVS (1ul << 12)
#define IOAPIC_LOGICAL (1ul << 11)
u32 ioapic_read(u32 reg);
void ioapic_write(u32 reg, u32 val);
u64 ioapic_get_entry(u32 pin);
void ioapic_set_entry(u32 pin, u64 entry);   /* writes the high half first, then the low half */
u32 ioapic_pin_count(void);                  /* max redirection entry + 1 */
void ioapic_mask_all(void);
void ioapic_eoi(u8 vector);                  /* the EOI register (0x40, version 20H): a directed EOI */

/* ---- 8259 PIC pair (master 0x20/0x21, slave 0xA0/0xA1) ------------------------------------------------------- */
void pic_init(u8 master_base, u8 slave_base);   /* ICW1-4, 8086 mode, cascade on IRQ2, all lines masked */
void pic_set_mask(u16 mask);                    /* bit n masks IRQ n (slave in bits 8-15) */
u16 pic_get_mask(void);
void pic_eoi(u32 irq);                          /* specific EOI (OCW2) to the slave and/or master */
u16 pic_read_irr(void);                         /* OCW3 read IRR, both chips */
u16 pic_read_isr(void);                         /* OCW3 read ISR, both chips */
void pic_disable(void);                         /* init to 0x20/0x28 and mask everything */

/* ---- SMP ----------------------------------------------------------------------------------------------------- */
extern u32 ncpus;                          /* from fw_cfg (capped at MAX_CPUS) */
extern volatile u32 cpu_online[MAX_CPUS];  /* set by each CPU when it reaches ap_main / at boot for CPU 0 */
extern volatile u32 cpu_apic_id[MAX_CPUS]; /* APIC ID each CPU read from its own APIC */
extern volatile u32 cpu_boot_count[MAX_CPUS]; /* times each CPU ran the trampoline (INIT/SIPI again) */
/* The APIC ID of CPU index i: from the ACPI MADT when the firmware/VMM provides one (found by scanning
 * 0xE0000-0xFFFFF for the RSDP, ACPI 6.5 §5.2.5.1; Processor Local APIC and x2APIC entries, enabled ones, the
 * BSP moved to index 0), else i. ncpus is the MADT's CPU count then (fw_cfg's otherwise), capped at MAX_CPUS.
 * A broadcast start-up (smp_start_all_broadcast) renumbers CPUs in arrival order and rewrites the table. */
extern volatile u32 cpu_enum_id[MAX_CPUS];
static inline u32 cpu_to_apic_id(u32 cpu) { return cpu_enum_id[cpu]; }
extern u32 madt_cpus;                      /* enabled CPUs the MADT lists (0 without one), uncapped */
extern u32 fwcfg_cpus;                     /* fw_cfg's CPU count (1 without fw_cfg), uncapped */
/* The RSDP's RSDT (its ACPI 1.0 field, which readers like kvm-unit-tests' library follow) is a valid RSDT that
 * finds the same FADT and MADT as the table the RSDP's revision selects (the XSDT from revision 2). */
bool acpi_rsdt_agrees(void);
u32 this_cpu(void);                        /* CPU index, from the stack pointer (no register access) */
/* Start AP `cpu` with INIT, 10 ms, SIPI, 200 us, SIPI (SDM vol. 3 "MP initialization", the universal start-up
 * algorithm); waits until it is online. Returns true on success. */
bool smp_start_ap(u32 cpu);
/* The two halves of smp_start_ap, for a guest that keeps an AP in wait-for-SIPI a while (SDM vol. 3 §9.4.2): an
 * INIT (the AP stops and waits for a SIPI; cpu_online[cpu] is cleared), and any time later SIPI, 200 us, SIPI
 * (trampoline copied first). Neither waits for the AP; callers check cpu_online (0 < cpu < MAX_CPUS). */
void smp_send_init(u32 cpu);
void smp_send_sipis(u32 cpu);
u32 smp_start_all(void);                   /* starts CPUs 1..ncpus-1, returns how many came online (incl. BSP) */
/* The delays of smp_start_ap: after INIT (default 10000 us, the SDM's 10 ms) and after each SIPI (default 200 us).
 * Linux uses 0 and 10 us on CPUs that do not need the legacy waits (x2APIC-era CPUs and hypervisors). */
extern u32 smp_init_delay_us, smp_sipi_delay_us;
/* Starts every AP at once, the way firmware does: INIT, SIPI, SIPI to "all excluding self" (ICR shorthand 11b),
 * with the delays above. Each AP takes the next CPU index in arrival order (a locked ticket in the trampoline)
 * and its stack; once ncpus-1 APs are online (bounded wait, `ms`), cpu_enum_id[c] becomes the APIC ID CPU c
 * read. Returns how many CPUs are online (incl. the BSP); APs past MAX_CPUS halt. */
u32 smp_start_all_broadcast(u64 ms);
extern volatile u32 ap_tickets;            /* APs that entered the trampoline during the broadcast start */
/* Hook run by each AP once on arrival (after the APIC is enabled, interrupts still off). */
extern void (*ap_arrival_hook)(u32 cpu);
/* Run fn(arg) on an idle AP: sets its mailbox, sends KICK_VECTOR and waits (bounded) until fn returned.
 * APs idle in a `cli; check mailbox; sti; hlt` loop. smp_call_async does not wait; smp_wait waits for it. */
bool smp_call(u32 cpu, void (*fn)(void *), void *arg);
bool smp_call_async(u32 cpu, void (*fn)(void *), void *arg);
bool smp_wait(u32 cpu, u64 ms);
/* Make an AP park itself in a `cli; hlt` loop (the state init_again wants). */
void smp_park_cli_hlt(void *unused);
extern volatile u32 cpu_parked[MAX_CPUS];
/* The trampoline page the SIPI vector points at. */
#define TRAMPOLINE_ADDR 0x8000

/* PIC remapped to 0x20/0x28 and fully masked, IOAPIC entries masked, local APIC enabled in the chosen mode
 * (x2APIC only if asked and CPUID has it), cpu_apic_id[0] filled in, interrupts enabled. */
void platform_init(bool x2apic);

/* ---- misc ---------------------------------------------------------------------------------------------------- */
extern u32 multiboot_magic, multiboot_info;
/* The decimal value of `key=` on the multiboot command line (a word starting with it), else `dflt`. */
u64 cmdline_u64(const char *key, u64 dflt);
void delay_us(u64 us);
/* Writes a 64-bit TSS descriptor for `tss` at gdt[slot], loads that GDT and TR (selector slot * 8). */
void load_gdt_with_tss(u64 *gdt, u32 entries, u32 slot, const void *tss);
#endif
