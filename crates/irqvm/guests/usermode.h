/* usermode.h: what the guests that run user-mode (CPL 3) code on every CPU share (syscall_smp, tlb_shootdown,
 * mm_reuse): Linux's GDT layout for SYSCALL and SYSRETQ (STAR[47:32] = 0x18: kernel CS 0x18, SS 0x20;
 * STAR[63:48] = 0x23: SYSRETQ to CS 0x33, SS 0x2B, which this host loads whatever STAR says, [pvm-sysret] in
 * README.md) with one 64-bit TSS per CPU, and the CPU index from the APIC ID. Each guest that includes it has
 * its own copy. */
#ifndef IRQVM_USERMODE_H
#define IRQVM_USERMODE_H
#include "guest.h"

#define KCODE 0x18                  /* the library's 64-bit code: STAR[47:32] */
#define KDATA 0x20                  /* SYSCALL's SS */
#define SYSRET_BASE 0x23            /* STAR[63:48], Linux's __USER32_CS */
#define UDATA 0x2B                  /* SYSRETQ's SS: STAR[63:48] + 8 */
#define UCODE 0x33                  /* SYSRETQ's 64-bit CS: STAR[63:48] + 16 */

/* The library's descriptors at 0x08-0x20 (the IDT's gates use 0x18), Linux's user pair, then one 16-byte TSS
 * descriptor per CPU. */
#define USER_GDT_FIXED 8
static u64 user_gdt[USER_GDT_FIXED + 2 * MAX_CPUS] __attribute__((aligned(16))) = {
	0,
	0x00CF9A000000FFFFul, /* 0x08: 32-bit code */
	0x00CF92000000FFFFul, /* 0x10: data */
	0x00AF9A000000FFFFul, /* 0x18: 64-bit code, DPL 0 (KCODE) */
	0x00CF92000000FFFFul, /* 0x20: data, DPL 0 (KDATA; also SYSRET's unused compatibility-mode CS slot) */
	0x00CFF2000000FFFFul, /* 0x28: data, DPL 3 (UDATA) */
	0x00AFFA000000FFFFul, /* 0x30: 64-bit code, DPL 3 (UCODE) */
	0,
};
/* 64-bit TSSs (SDM vol. 3 8.7): RSP0 at offset 4. */
static u8 user_tss[MAX_CPUS][128] __attribute__((aligned(64)));

/* CPU c's GDT (the shared table with c's TSS in c's slot) and TR. */
static inline void load_user_gdt(u32 c)
{
	load_gdt_with_tss(user_gdt, sizeof(user_gdt) / sizeof(user_gdt[0]), USER_GDT_FIXED + 2 * c, user_tss[c]);
}

/* The CPU index from the APIC ID: a fault may come before the code it interrupts switched stacks (this_cpu()
 * goes by RSP). */
static inline u32 cpu_by_apic(void)
{
	u32 id = apic_id();
	for (u32 c = 0; c < ncpus; c++)
		if (cpu_apic_id[c] == id)
			return c;
	return 0;
}

/* This CPU's LAPIC timer, periodic every `us` microseconds on `vector` (divide by 1: the 1 GHz bus clock of
 * the VMMs these guests run on), and stopped again. */
static inline void start_periodic_tick(u32 vector, u64 us)
{
	apic_write(APIC_TDCR, 0xB);
	apic_write(APIC_LVT_TIMER, APIC_TIMER_PERIODIC | vector);
	apic_write(APIC_TMICT, (u32)(us * 1000));
}

static inline void stop_tick(void)
{
	apic_write(APIC_TMICT, 0);
	apic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
}

/* The neighbour ring: CPU c sends an IPI to CPU c + 1, one outstanding at a time (two of one vector waiting in
 * an IRR are one); the handler counts it with ring_received(). */
static volatile u32 ring_sent[MAX_CPUS], ring_got[MAX_CPUS];

static inline void ring_ping(u32 c, u32 vector)
{
	u32 next = (c + 1) % ncpus;
	if (ncpus > 1 && READ_ONCE(ring_got[next]) == ring_sent[c] && apic_send_fixed(cpu_to_apic_id(next), vector))
		ring_sent[c]++;
}

static inline void ring_received(u32 cpu) { ring_got[cpu]++; }

/* For wait_until: every ring IPI sent has arrived. */
static inline bool ring_all_landed(void *unused)
{
	u32 sent = 0, got = 0;
	for (u32 c = 0; c < ncpus; c++) {
		sent += ring_sent[c];
		got += ring_got[c];
	}
	return sent == got;
}
#endif
